//! Base64 as senders write it: standard or URL alphabet, padded or not
//! (SPEC §3: "on input every base64 form is accepted"). Output is always
//! URL-safe without padding.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const URL: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Decodes any base64 form; `None` when it is not base64.
pub fn decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim();
    if input.bytes().any(|b| b == b'+' || b == b'/') {
        // Map the standard alphabet onto the URL one: one decoder for all.
        let mapped: String = input.chars().map(|c| match c { '+' => '-', '/' => '_', c => c }).collect();
        return URL.decode(mapped).ok();
    }
    URL.decode(input).ok()
}

/// URL-safe base64 without padding.
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form() {
        let bytes = [0xfbu8, 0xff, 0xbf, 0x01];
        for form in ["+/+/AQ==", "+/+/AQ", "-_-_AQ==", "-_-_AQ", " -_-_AQ "] {
            assert_eq!(decode(form).as_deref(), Some(&bytes[..]), "{form}");
        }
        assert_eq!(encode(&bytes), "-_-_AQ");
        assert_eq!(decode("not base64!"), None);
        assert_eq!(decode("").as_deref(), Some(&[][..]));
    }
}
