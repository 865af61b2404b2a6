//! Web Push ingress parsing: from an HTTP request to one validated message,
//! or a precise error that maps to exactly one status code of SPEC §4.

pub mod b64;
pub mod crypto;
mod params;
pub mod payload;
pub mod vapid;

use push_relay_providers::Urgency;

/// Largest body accepted (RFC 8030 §7.2 push services must accept 4096).
pub const MAX_BODY: usize = 4096;

/// The Web Push headers that are not about encryption or VAPID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Seconds; `None` when the sender gave none (or none readable).
    pub ttl: Option<u32>,
    pub urgency: Urgency,
    pub topic: Option<String>,
}

/// Reads `TTL`, `Urgency` and `Topic` leniently: a value a sender got wrong
/// never costs the user their subscription (Mastodon deletes it on any
/// 4xx), so unreadable values fall back to defaults instead of a `400`.
/// - `TTL`: delta-seconds; negative counts as 0, non-numeric as absent.
/// - `Urgency`: RFC 8030 §5.3 values, any case; others count as `normal`.
/// - `Topic`: RFC 8030 §5.4, at most 32 base64url characters; others are
///   ignored (the message is delivered, only without replacement).
pub fn delivery(ttl: Option<&str>, urgency: Option<&str>, topic: Option<&str>) -> Delivery {
    let ttl = ttl.and_then(|t| {
        let t = t.trim();
        match t.parse::<i64>() {
            Ok(n) => Some(n.clamp(0, u32::MAX as i64) as u32),
            Err(_) if t.starts_with('-') && t[1..].bytes().all(|b| b.is_ascii_digit()) => Some(0),
            Err(_) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => Some(u32::MAX),
            Err(_) => None,
        }
    });
    let urgency = urgency.and_then(Urgency::parse).unwrap_or_default();
    let topic = topic
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 32 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .map(str::to_string);
    Delivery { ttl, urgency, topic }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_delivery_headers() {
        let d = delivery(Some("60"), Some("HIGH"), Some("timeline-1"));
        assert_eq!(d, Delivery { ttl: Some(60), urgency: Urgency::High, topic: Some("timeline-1".into()) });
        assert_eq!(delivery(Some("0"), None, None).ttl, Some(0));
        assert_eq!(delivery(Some(" 2419200 "), None, None).ttl, Some(2_419_200));
        assert_eq!(delivery(Some("-5"), None, None).ttl, Some(0));
        assert_eq!(delivery(Some("99999999999999999999"), None, None).ttl, Some(u32::MAX));
        assert_eq!(delivery(Some("soon"), None, None).ttl, None);
        assert_eq!(delivery(None, Some("whenever"), None).urgency, Urgency::Normal);
        assert_eq!(delivery(None, Some("very-low"), None).urgency, Urgency::VeryLow);
        assert_eq!(delivery(None, None, Some("has space")).topic, None);
        assert_eq!(delivery(None, None, Some(&"a".repeat(33))).topic, None);
        assert_eq!(delivery(None, None, Some(&"a".repeat(32))).topic, Some("a".repeat(32)));
    }
}
