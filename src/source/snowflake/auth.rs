//! Snowflake authentication: a key-pair JWT signed here, or an OAuth access token given as is.
//!
//! Key-pair authentication (<https://docs.snowflake.com/en/developer-guide/sql-api/authenticating>):
//! an RS256 JWT whose `iss` is `ACCOUNT.USER.SHA256:<fingerprint>` and `sub` is
//! `ACCOUNT.USER`, where the fingerprint is the base64 SHA-256 of the public key's DER
//! SubjectPublicKeyInfo, and which lives at most one hour. It travels as a bearer token with
//! `X-Snowflake-Authorization-Token-Type: KEYPAIR_JWT`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::RsaKeyPair;

use super::super::SourceError;
use super::super::rest::{Http, Mint, Token};

/// How long a signed JWT is valid; Snowflake refuses more than an hour.
const JWT_LIFETIME: Duration = Duration::from_secs(59 * 60);

/// How requests authenticate.
pub(super) enum Auth {
    /// Key-pair JWTs signed with this key.
    KeyPair(KeyPair),
    /// An OAuth access token, used as given (it is not renewed: a refused one is an error).
    OAuth(String),
}

impl Auth {
    /// The value of `X-Snowflake-Authorization-Token-Type`.
    pub(super) fn token_type(&self) -> &'static str {
        match self {
            Auth::KeyPair(_) => "KEYPAIR_JWT",
            Auth::OAuth(_) => "OAUTH",
        }
    }
}

/// A private key and the claims it signs.
pub(super) struct KeyPair {
    key: EncodingKey,
    issuer: String,
    subject: String,
}

impl KeyPair {
    /// Reads a PEM private key (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`) for
    /// `account` and `user`. The error never quotes the key.
    pub(super) fn new(pem_text: &str, account: &str, user: &str) -> Result<KeyPair, String> {
        let block = pem::parse(pem_text.trim())
            .map_err(|_| "the private_key key does not hold a PEM private key".to_owned())?;
        let pair = match block.tag() {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(block.contents()),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(block.contents()),
            "ENCRYPTED PRIVATE KEY" => {
                return Err("the private_key is encrypted; store it unencrypted in the Secret (see docs/sources/snowflake.md)".to_owned());
            }
            other => return Err(format!("the private_key holds a PEM {other:?}, not an RSA private key")),
        }
        .map_err(|e| format!("the private_key is not a usable RSA key ({e})"))?;
        let fingerprint = public_key_fingerprint(pair.public().as_ref());
        let key = EncodingKey::from_rsa_pem(pem_text.trim().as_bytes())
            .map_err(|e| format!("the private_key is not a usable RSA key ({e})"))?;
        let qualified = format!("{}.{}", jwt_account(account), user.to_ascii_uppercase());
        Ok(KeyPair {
            key,
            issuer: format!("{qualified}.SHA256:{fingerprint}"),
            subject: qualified,
        })
    }

    /// The `iss` claim (it names the public key, which is not secret).
    pub(super) fn issuer(&self) -> &str {
        &self.issuer
    }

    fn sign(&self, now: SystemTime) -> Result<Token, String> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_owned())?
            .as_secs();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": self.subject,
            "iat": iat,
            "exp": iat.saturating_add(JWT_LIFETIME.as_secs()),
        });
        let value = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| format!("failed to sign the key-pair JWT: {e}"))?;
        Ok(Token {
            value,
            expires_at: tokio::time::Instant::now() + JWT_LIFETIME,
        })
    }
}

/// `SHA256:` fingerprint's base64 part: the SHA-256 of the DER SubjectPublicKeyInfo of an RSA
/// public key given as PKCS#1 `RSAPublicKey` DER.
pub(super) fn public_key_fingerprint(rsa_public_key: &[u8]) -> String {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const RSA_ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(rsa_public_key);
    let mut inner = RSA_ALGORITHM.to_vec();
    inner.extend(der_wrap(0x03, &bit_string));
    let spki = der_wrap(0x30, &inner);
    let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn der_wrap(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// The account as the JWT names it: upper case, without the region or cloud part of an
/// account locator (`xy12345.us-east-2.aws` → `XY12345`).
pub(super) fn jwt_account(account: &str) -> String {
    account.split('.').next().unwrap_or(account).to_ascii_uppercase()
}

#[async_trait]
impl Mint for Auth {
    async fn mint(&self, _http: &Http) -> Result<Token, SourceError> {
        match self {
            Auth::KeyPair(pair) => pair.sign(SystemTime::now()).map_err(|reason| SourceError::Auth {
                target: "snowflake".to_owned(),
                reason,
            }),
            // An OAuth token's lifetime is the issuer's business: keep it until refused.
            Auth::OAuth(token) => Ok(Token {
                value: token.clone(),
                expires_at: tokio::time::Instant::now() + Duration::from_secs(365 * 86_400),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_lose_their_region_and_names_are_upper_case() {
        assert_eq!(jwt_account("xy12345.us-east-2.aws"), "XY12345");
        assert_eq!(jwt_account("myorg-account1"), "MYORG-ACCOUNT1");
    }

    #[test]
    fn long_der_lengths_use_the_long_form() {
        assert_eq!(der_wrap(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der_wrap(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn text_that_is_not_a_key_is_refused_without_quoting_it() {
        let err = KeyPair::new("hunter2-not-a-key", "acme", "u").err().unwrap();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
