//! [`ConfigError`] and the code that turns a byte span of the source into a
//! `file:line:column` position and a dotted key such as `server.listen`.

use std::fmt;
use std::ops::Range;

/// Why a configuration file was refused.
///
/// The [`Display`](fmt::Display) form is meant to be shown to an operator as
/// is, compiler style:
///
/// ```text
/// push-relay.toml:12:10: key `server.listen`: invalid socket address syntax (expected e.g. "127.0.0.1:8080")
/// ```
///
/// Line and column are 1-based; the column counts characters, not bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    origin: String,
    position: Option<(usize, usize)>,
    key: Option<String>,
    message: String,
}

impl ConfigError {
    /// The 1-based line the error points at, when it points into the file.
    pub fn line(&self) -> Option<usize> {
        self.position.map(|(line, _)| line)
    }

    /// The 1-based column (in characters) the error points at.
    pub fn column(&self) -> Option<usize> {
        self.position.map(|(_, column)| column)
    }

    /// The dotted key at fault, e.g. `limits.per_instance.burst`.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// What went wrong and what was expected, without position or key.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// An error about the file as a whole (e.g. it cannot be read).
    pub(crate) fn whole_file(origin: &str, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            position: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about `key`, located at `span` in `source` when known.
    pub(crate) fn at(
        src: &Source<'_>,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            origin: src.origin.to_owned(),
            position: span.map(|s| line_column(src.text, s.start)),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// Converts an error from the TOML parser or from serde, recovering the
    /// dotted key from the source text around the span toml reports.
    pub(crate) fn from_toml(src: &Source<'_>, err: &toml::de::Error) -> Self {
        let message = humanize(err.message().trim());
        let Some(span) = err.span() else {
            return ConfigError::whole_file(src.origin, message);
        };
        let start = clamp_to_char_boundary(src.text, span.start);
        let mut key = key_at(src.text, start);
        // "missing field `kind`" points at the enclosing table: name the
        // missing key itself.
        if let Some(field) = backticked_after(&message, "missing field ") {
            key = Some(match key {
                Some(table) if !table.is_empty() => format!("{table}.{field}"),
                _ => field.to_owned(),
            });
        }
        ConfigError {
            origin: src.origin.to_owned(),
            position: Some(line_column(src.text, start)),
            key: key.filter(|k| !k.is_empty()),
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Rewords serde's Rust-type vocabulary ("expected u32") for operators.
fn humanize(message: &str) -> String {
    let mut out = message.to_owned();
    for ty in ["usize", "u64", "u32"] {
        out = out.replace(&format!("expected {ty}"), "expected a non-negative integer");
    }
    out.replace("expected a boolean", "expected true or false")
}

/// The text being parsed and the name to show for it in messages.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub text: &'a str,
    pub origin: &'a str,
}

fn clamp_to_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// 1-based (line, column) of byte offset `at`; the column counts characters.
pub(crate) fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = clamp_to_char_boundary(text, at);
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The text between the first two backticks after `prefix` in `message`.
fn backticked_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split('`').next()
}

/// Best-effort dotted key for the byte offset `at`: the innermost table
/// header above it, then the `key =` path of its line, then the keys of the
/// inline tables (`{ ... }`) that enclose `at` on that line.
pub(crate) fn key_at(text: &str, at: usize) -> Option<String> {
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[line_start..line_end];
    let col = at - line_start;

    // The error is on a header line itself (`[servr]`): the header is the key.
    if let Some(header) = parse_header(line) {
        return Some(header.join("."));
    }

    let mut path: Vec<String> = text[..line_start]
        .lines()
        .rev()
        .find_map(parse_header)
        .unwrap_or_default();

    // Walk the line up to `at`, tracking `key =` and `{`/`}` nesting.
    let mut scanner = Scanner::new(&line[..col]);
    let mut stack: Vec<Vec<String>> = Vec::new(); // keys of open inline tables
    let mut pending: Option<Vec<String>> = None; // `key =` awaiting its value
    while let Some(token) = scanner.next_token() {
        match token {
            Token::Key(k) => {
                scanner.skip_ws();
                if scanner.eat('=') {
                    pending = Some(k);
                }
            }
            Token::Open => {
                stack.push(pending.take().unwrap_or_default());
            }
            Token::Close => {
                stack.pop();
                pending = None;
            }
            Token::Comma => pending = None,
            Token::Other => {}
        }
    }
    for keys in stack {
        path.extend(keys);
    }
    match pending {
        // `at` is in the value of `key =`.
        Some(keys) => path.extend(keys),
        // `at` is on a key itself (e.g. an unknown field): read it.
        None => {
            if let Some(Token::Key(k)) = Scanner::new(&line[col..]).next_token() {
                path.extend(k);
            }
        }
    }
    Some(path.join("."))
}

/// `[a.b]` or `[[a.b]]` → `["a", "b"]`.
fn parse_header(line: &str) -> Option<Vec<String>> {
    let trimmed = line.trim_start();
    let inner = trimmed
        .strip_prefix("[[")
        .or_else(|| trimmed.strip_prefix('['))?;
    let mut scanner = Scanner::new(inner);
    match scanner.next_token() {
        Some(Token::Key(k)) => Some(k),
        _ => None,
    }
}

enum Token {
    /// A possibly dotted key: `a`, `a.b`, `"quoted".c`.
    Key(Vec<String>),
    Open,
    Close,
    Comma,
    Other,
}

/// A tiny lexer good enough to find keys on one line of TOML.
struct Scanner<'a> {
    rest: &'a str,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        Scanner { rest: text }
    }

    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    fn eat(&mut self, c: char) -> bool {
        match self.rest.strip_prefix(c) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }

    fn next_token(&mut self) -> Option<Token> {
        self.skip_ws();
        let c = self.rest.chars().next()?;
        match c {
            '{' => {
                self.rest = &self.rest[1..];
                Some(Token::Open)
            }
            '}' => {
                self.rest = &self.rest[1..];
                Some(Token::Close)
            }
            ',' => {
                self.rest = &self.rest[1..];
                Some(Token::Comma)
            }
            '#' => {
                self.rest = "";
                None
            }
            c if is_bare(c) || c == '"' || c == '\'' => {
                let mut parts = Vec::new();
                loop {
                    self.skip_ws();
                    parts.push(self.key_part()?);
                    self.skip_ws();
                    if !self.eat('.') {
                        break;
                    }
                }
                Some(Token::Key(parts))
            }
            _ => {
                let len = c.len_utf8();
                self.rest = &self.rest[len..];
                Some(Token::Other)
            }
        }
    }

    fn key_part(&mut self) -> Option<String> {
        let c = self.rest.chars().next()?;
        if c == '"' || c == '\'' {
            let body = &self.rest[1..];
            let end = body.find(c).unwrap_or(body.len());
            let part = body[..end].to_owned();
            self.rest = body.get(end + 1..).unwrap_or("");
            Some(part)
        } else {
            let end = self.rest.find(|c| !is_bare(c)).unwrap_or(self.rest.len());
            let part = self.rest[..end].to_owned();
            self.rest = &self.rest[end..];
            Some(part)
        }
    }
}

fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}
