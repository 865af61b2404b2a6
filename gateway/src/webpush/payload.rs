//! The decrypted payload of a Fediverse push: Mastodon's shape, which
//! Pleroma/Akkoma, GoToSocial and Misskey-compatible servers follow closely:
//! `{"access_token", "preferred_locale", "notification_id",
//! "notification_type", "icon", "title", "body"}`.
//!
//! Only the fields the phone needs are kept. The access token is never
//! copied out of the plaintext, and the plaintext is wiped after parsing.

use push_relay_providers::Content;
use serde_json::Value;

/// Reads a decrypted payload; `None` when it is not a JSON object (the
/// message is then delivered opaque, as if decryption were not allowed).
pub fn parse(mut plaintext: Vec<u8>) -> Option<Content> {
    let parsed = serde_json::from_slice::<Value>(&plaintext);
    plaintext.iter_mut().for_each(|b| *b = 0);
    let Ok(Value::Object(mut object)) = parsed else { return None };
    if let Some(token) = object.get_mut("access_token") {
        *token = Value::Null;
    }
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        // GoToSocial sends string ids, Mastodon numbers.
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    Some(Content::Decrypted {
        title: text(object.get("title")),
        body: text(object.get("body")),
        notification_id: text(object.get("notification_id")),
        notification_type: text(object.get("notification_type")),
        icon: object.get("icon").and_then(Value::as_str).map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mastodon_and_gotosocial_shapes() {
        let mastodon = br#"{"access_token":"SECRET-TOKEN","preferred_locale":"en","notification_id":123,
            "notification_type":"mention","icon":"https://i/a.png","title":"Alice mentioned you","body":"hi"}"#;
        let content = parse(mastodon.to_vec()).unwrap();
        assert_eq!(
            content,
            Content::Decrypted {
                title: "Alice mentioned you".into(),
                body: "hi".into(),
                notification_id: "123".into(),
                notification_type: "mention".into(),
                icon: Some("https://i/a.png".into()),
            }
        );
        assert!(!format!("{content:?}").contains("SECRET-TOKEN"));
        let gts = br#"{"access_token":"x","notification_id":"01HABC","notification_type":"follow","title":"t","body":"b"}"#;
        match parse(gts.to_vec()).unwrap() {
            Content::Decrypted { notification_id, icon, .. } => {
                assert_eq!(notification_id, "01HABC");
                assert_eq!(icon, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(b"not json".to_vec()), None);
        assert_eq!(parse(b"[1,2]".to_vec()), None);
    }
}
