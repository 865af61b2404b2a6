//! Parameter lists in `Crypto-Key`, `Encryption` and `Authorization: vapid`.
//!
//! Senders disagree on the separators: Mastodon writes
//! `dh=…;p256ecdsa=…`, others `dh=…, p256ecdsa=…` or `keyid=p256dh;dh=…`,
//! some quote values. We read every `name=value` pair separated by `;` or
//! `,`, trimmed and unquoted, and take the first of each name.

/// The first value of `name` (case-insensitive) in a header's parameters.
pub fn param<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split([';', ','])
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
        .map(|(_, value)| unquote(value.trim()))
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
        .trim()
}

#[cfg(test)]
mod tests {
    use super::param;

    #[test]
    fn separators_and_quotes() {
        let mastodon = "dh=BNoRD;p256ecdsa=BDd3";
        assert_eq!(param(mastodon, "dh"), Some("BNoRD"));
        assert_eq!(param(mastodon, "p256ecdsa"), Some("BDd3"));
        let spaced = r#"keyid=p256dh; dh="BNoRD" , p256ecdsa = BDd3=="#;
        assert_eq!(param(spaced, "dh"), Some("BNoRD"));
        assert_eq!(param(spaced, "p256ecdsa"), Some("BDd3=="));
        assert_eq!(param("salt=abc;rs=4096", "RS"), Some("4096"));
        assert_eq!(param("salt=abc", "rs"), None);
        assert_eq!(param("", "dh"), None);
    }
}
