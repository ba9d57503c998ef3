//! Webhook signatures, computed per attempt with HMAC keys precomputed per secret.
//!
//! - Pusher format: `X-Pusher-Key` and `X-Pusher-Signature` = hex HMAC-SHA256 of the exact
//!   body with the app secret (https://pusher.com/docs/channels/server_api/webhooks/#authentication).
//! - Standard Webhooks: `webhook-signature` = space-separated `v1,<base64 HMAC-SHA256>` of
//!   `"{id}.{timestamp}.{body}"`, one entry per secret so keys can rotate without downtime
//!   (the Standard Webhooks spec, https://www.standardwebhooks.com/). Entries are always well formed (some verifiers crash on
//!   malformed ones).
//!
//! `Debug` never prints a secret.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ring::hmac;

use crate::config::decode_standard_secret;

/// The HMAC keys of a Standard Webhooks endpoint, one per active secret.
pub struct StandardSigner {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for StandardSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StandardSigner({} secrets)", self.keys.len())
    }
}

/// A secret that is not `whsec_<base64>` (or plain base64) of 24..=64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(pub String);

impl StandardSigner {
    /// Keys from secrets in the `whsec_<base64>` form (the prefix is optional).
    pub fn new(secrets: &[String]) -> Result<StandardSigner, SecretError> {
        if secrets.is_empty() {
            return Err(SecretError("a standard endpoint needs at least one secret".into()));
        }
        let keys = secrets
            .iter()
            .map(|secret| {
                let bytes = decode_standard_secret(secret).map_err(SecretError)?;
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StandardSigner { keys })
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let timestamp = timestamp.to_string();
        let mut out = String::with_capacity(self.keys.len() * 48);
        for key in &self.keys {
            let mut context = hmac::Context::with_key(key);
            context.update(id.as_bytes());
            context.update(b".");
            context.update(timestamp.as_bytes());
            context.update(b".");
            context.update(body);
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("v1,");
            BASE64.encode_string(context.sign().as_ref(), &mut out);
        }
        out
    }
}

/// `X-Pusher-Signature`: hex HMAC-SHA256 of the body with the app's secret key.
pub fn pusher_signature(app_secret: &hmac::Key, body: &[u8]) -> String {
    hex::encode(hmac::sign(app_secret, body).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference vector (libraries/rust test_sign).
    #[test]
    fn standard_reference_vector() {
        let signer = StandardSigner::new(&["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()]).unwrap();
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(
            signer.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    /// Two secrets sign at once, space-separated, each entry well formed.
    #[test]
    fn rotation_signs_with_every_secret() {
        let secrets =
            ["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()];
        let signature = StandardSigner::new(&secrets).unwrap().sign("msg_1", 1, b"{}");
        let entries: Vec<&str> = signature.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.starts_with("v1,") && e.matches(',').count() == 1));
    }

    /// Bad secrets are refused with a reason; Debug hides them.
    #[test]
    fn bad_secrets_refused() {
        assert!(StandardSigner::new(&[]).is_err());
        assert!(StandardSigner::new(&["whsec_!!!".into()]).unwrap_err().0.contains("base64"));
        assert!(StandardSigner::new(&["whsec_AAAA".into()]).unwrap_err().0.contains("bytes"));
        let signer = StandardSigner::new(&["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()]).unwrap();
        assert_eq!(format!("{signer:?}"), "StandardSigner(1 secrets)");
    }

    /// The Pusher signature is hex HMAC-SHA256 of the body (checked against Python's hmac).
    #[test]
    fn pusher_signature_vector() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"secret");
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"secret",b"{}",hashlib.sha256).hexdigest())'
        assert_eq!(pusher_signature(&key, b"{}"), "77325902caca812dc259733aacd046b73817372c777b8d95b402647474516e13");
    }
}
