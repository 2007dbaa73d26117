//! Password hashing shared by every backend: argon2id (PHC strings) for new passwords,
//! bcrypt only to verify entries imported from nginx htpasswd files.

use std::sync::{Arc, OnceLock};

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;

use crate::{PasswordScheme, StoreError};

/// Verified against when the user does not exist, so an unknown name costs about as much
/// as a wrong password.
static DUMMY_HASH: OnceLock<String> = OnceLock::new();

pub(crate) fn scheme_of(stored: &str) -> Option<PasswordScheme> {
    if stored.starts_with("$argon2") {
        Some(PasswordScheme::Argon2id)
    } else if stored.starts_with("$2") {
        Some(PasswordScheme::Bcrypt)
    } else {
        None
    }
}

/// Accepts the bcrypt variants nginx/htpasswd produce.
pub(crate) fn validate_bcrypt(hash: &str) -> Result<(), StoreError> {
    let prefix_ok = ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p));
    if prefix_ok && hash.parse::<bcrypt::HashParts>().is_ok() {
        Ok(())
    } else {
        // The hash itself is never echoed back.
        Err(StoreError::Other(
            "not a bcrypt ($2a$/$2b$/$2y$) hash".into(),
        ))
    }
}

pub(crate) fn validate_password(password: &str) -> Result<(), StoreError> {
    if password.is_empty() {
        return Err(StoreError::Other("empty password".into()));
    }
    Ok(())
}

fn argon2_hash(password: &[u8]) -> Result<String, StoreError> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|_| StoreError::Other("password hashing failed".into()))
}

fn dummy_hash() -> Result<&'static str, StoreError> {
    if let Some(h) = DUMMY_HASH.get() {
        return Ok(h);
    }
    let h = argon2_hash(&rand::random::<[u8; 16]>())?;
    Ok(DUMMY_HASH.get_or_init(|| h))
}

/// The outcome of a verification.
#[derive(Debug)]
pub(crate) enum Verified {
    No,
    /// `rehash` holds a fresh argon2id hash when the stored one was bcrypt.
    Yes {
        rehash: Option<String>,
    },
}

/// Runs argon2 on the blocking pool, with at most one hash per core at a time: each one
/// takes ~19 MiB, and 200 participants logging in at once must not take 4 GiB.
#[derive(Debug, Clone)]
pub(crate) struct Hasher {
    gate: Arc<Semaphore>,
}

impl Hasher {
    pub(crate) fn new() -> Self {
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hasher {
            gate: Arc::new(Semaphore::new(permits)),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| StoreError::Other("password hasher closed".into()))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| StoreError::Other("password hashing task failed".into()))?
    }

    pub(crate) async fn hash(&self, password: &str) -> Result<String, StoreError> {
        let pw = password.to_owned();
        self.run(move || argon2_hash(pw.as_bytes())).await
    }

    /// `stored: None` (unknown user) verifies against a dummy hash and answers `No`.
    pub(crate) async fn verify(
        &self,
        password: &str,
        stored: Option<String>,
    ) -> Result<Verified, StoreError> {
        let pw = password.to_owned();
        self.run(move || {
            let Some(stored) = stored else {
                let _ = Argon2::default().verify_password(pw.as_bytes(), dummy_hash()?);
                return Ok(Verified::No);
            };
            match scheme_of(&stored) {
                Some(PasswordScheme::Argon2id) => {
                    if Argon2::default()
                        .verify_password(pw.as_bytes(), stored.as_str())
                        .is_ok()
                    {
                        Ok(Verified::Yes { rehash: None })
                    } else {
                        Ok(Verified::No)
                    }
                }
                Some(PasswordScheme::Bcrypt) => {
                    if bcrypt::verify(pw.as_bytes(), &stored).unwrap_or(false) {
                        Ok(Verified::Yes {
                            rehash: Some(argon2_hash(pw.as_bytes())?),
                        })
                    } else {
                        Ok(Verified::No)
                    }
                }
                // A stored value we cannot interpret never verifies.
                None => Ok(Verified::No),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn argon2_roundtrip_and_bcrypt() {
        let h = Hasher::new();
        let phc = h.hash("pw").await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(matches!(
            h.verify("pw", Some(phc.clone())).await.unwrap(),
            Verified::Yes { rehash: None }
        ));
        assert!(matches!(
            h.verify("pX", Some(phc)).await.unwrap(),
            Verified::No
        ));
        assert!(matches!(h.verify("pw", None).await.unwrap(), Verified::No));

        let b = bcrypt::hash("pw", 4).unwrap().replacen("$2b$", "$2y$", 1);
        validate_bcrypt(&b).unwrap();
        match h.verify("pw", Some(b.clone())).await.unwrap() {
            Verified::Yes { rehash: Some(n) } => {
                assert_eq!(scheme_of(&n), Some(PasswordScheme::Argon2id))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            h.verify("no", Some(b)).await.unwrap(),
            Verified::No
        ));
        assert!(validate_bcrypt("$1$abc").is_err());
        assert!(validate_bcrypt("$2y$04$short").is_err());
        assert!(matches!(
            h.verify("pw", Some("plain".into())).await.unwrap(),
            Verified::No
        ));
    }
}
