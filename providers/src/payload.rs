//! Mapping a notification to the `data` an app receives (SPEC §5), shared by
//! every provider so that apps see the same fields whatever delivers them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;

use crate::{Content, Notification};

/// The payload limit of Expo, APNs and FCM alike: 4 KB.
pub const DEFAULT_PAYLOAD_LIMIT: usize = 4096;

/// The custom data of a notification, as JSON-serializable fields.
/// Every value is a string (or `fetch`, a boolean in JSON providers), which
/// FCM requires and the others accept.
#[derive(Debug, Serialize)]
pub struct OpaqueData<'a> {
    pub registration: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enc: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dh: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch: Option<bool>,
}

impl<'a> OpaqueData<'a> {
    /// The data fields of SPEC §5 for this notification.
    pub fn of(n: &'a Notification) -> OpaqueData<'a> {
        let mut data = OpaqueData {
            registration: &n.registration,
            instance: Some(&n.instance),
            account: n.account.as_deref(),
            notification_id: None,
            notification_type: None,
            enc: None,
            body: None,
            salt: None,
            dh: None,
            message_id: None,
            fetch: None,
        };
        match &n.content {
            Content::Decrypted {
                notification_id,
                notification_type,
                ..
            } => {
                data.notification_id = Some(notification_id);
                data.notification_type = Some(notification_type);
            }
            Content::Opaque {
                encoding,
                body,
                salt,
                dh,
            } => {
                data.enc = Some(encoding.as_str());
                data.body = Some(URL_SAFE_NO_PAD.encode(body));
                data.salt = salt.as_ref().map(|s| URL_SAFE_NO_PAD.encode(s));
                data.dh = dh.as_ref().map(|d| URL_SAFE_NO_PAD.encode(d));
            }
            Content::Fetch => {
                // SPEC §5: only what is needed to fetch the body.
                data.instance = None;
                data.account = None;
                data.message_id = Some(&n.message_id);
                data.fetch = Some(true);
            }
        }
        data
    }
}
