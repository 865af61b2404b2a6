//! `${VAR}` expansion inside string values.

/// What went wrong while expanding one string value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ExpandError {
    /// `${NAME}` named a variable the environment does not have.
    Unset(String),
    /// Malformed syntax; the message says what was expected.
    Syntax(String),
}

impl ExpandError {
    pub(crate) fn message(&self) -> String {
        match self {
            ExpandError::Unset(name) => format!(
                "environment variable `{name}` is not set (referenced as `${{{name}}}`; write `$$` for a literal `$`)"
            ),
            ExpandError::Syntax(msg) => msg.clone(),
        }
    }
}

/// Expands `${NAME}` from `env` and `$$` to `$`.
///
/// `NAME` is `[A-Za-z_][A-Za-z0-9_]*`. Any other use of `$` is an error, so
/// that a `$TOKEN` meant as a reference is not silently kept as text.
pub(crate) fn expand(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let Some(end) = r.find('}') else {
                return Err(ExpandError::Syntax(
                    "unterminated `${`: expected `${NAME}` (write `$$` for a literal `$`)".into(),
                ));
            };
            let name = &r[..end];
            if !is_var_name(name) {
                return Err(ExpandError::Syntax(format!(
                    "invalid variable name `{name}` in `${{{name}}}`: expected letters, digits and `_`, not starting with a digit"
                )));
            }
            match env(name) {
                Some(v) => out.push_str(&v),
                None => return Err(ExpandError::Unset(name.to_owned())),
            }
            rest = &r[end + 1..];
        } else {
            return Err(ExpandError::Syntax(
                "a lone `$`: write `${NAME}` to use an environment variable or `$$` for a literal `$`"
                    .into(),
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/relay".to_owned())
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(
            expand("${HOME_DIR}/x", &env).as_deref(),
            Ok("/home/relay/x")
        );
        assert_eq!(
            expand("a$$b$${HOME_DIR}", &env).as_deref(),
            Ok("a$b${HOME_DIR}")
        );
        assert_eq!(expand("plain", &env).as_deref(), Ok("plain"));
        assert_eq!(expand("", &env).as_deref(), Ok(""));
    }

    #[test]
    fn refuses_bad_syntax() {
        assert_eq!(
            expand("${NOPE}", &env),
            Err(ExpandError::Unset("NOPE".into()))
        );
        assert!(matches!(
            expand("${HOME_DIR", &env),
            Err(ExpandError::Syntax(_))
        ));
        assert!(matches!(expand("${1X}", &env), Err(ExpandError::Syntax(_))));
        assert!(matches!(expand("${}", &env), Err(ExpandError::Syntax(_))));
        assert!(matches!(
            expand("$HOME_DIR", &env),
            Err(ExpandError::Syntax(_))
        ));
        assert!(matches!(
            expand("trailing$", &env),
            Err(ExpandError::Syntax(_))
        ));
    }
}
