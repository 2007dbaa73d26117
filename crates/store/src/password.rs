//! Password hashing shared by every backend: argon2id (PHC strings) for new passwords,
//! bcrypt only to verify entries imported from nginx htpasswd files.

use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{ARGON2ID_IDENT, Algorithm, Argon2, Block, Params, PasswordHash, Version};
use tokio::sync::Semaphore;

use crate::{PasswordScheme, StoreError};

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

/// The cost of new hashes: argon2id with the crate's defaults (OWASP's m = 19 MiB, t = 2, p = 1).
fn new_params() -> Params {
    Params::default()
}

/// Stored hashes asking for more memory than this are refused rather than verified: one
/// bad row must not make the server allocate gigabytes.
const MAX_M_COST_KIB: u32 = 256 * 1024;

/// Runs argon2 in `mem`, growing it when `params` need more blocks. The block memory is
/// reused from hash to hash: freeing it would not give it back to the kernel (glibc raises
/// its mmap threshold after the first 19 MiB block and keeps later ones in per-thread
/// arenas), so twenty first sign-ins left ~20 blocks resident.
fn argon2_into(
    alg: Algorithm,
    ver: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    mem: &mut Vec<Block>,
) -> Result<Output, StoreError> {
    let failed = |_| StoreError::Other("password hashing failed".into());
    if params.m_cost() > MAX_M_COST_KIB {
        return Err(StoreError::Other(
            "password hash asks for too much memory".into(),
        ));
    }
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let blocks = params.block_count();
    if mem.len() < blocks {
        mem.resize(blocks, Block::default());
    }
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = out
        .get_mut(..len)
        .ok_or(StoreError::Other("hash too long".into()))?;
    Argon2::new(alg, ver, params)
        .hash_password_into_with_memory(password, salt, out, &mut mem[..blocks])
        .map_err(failed)?;
    Output::new(out).map_err(|_| StoreError::Other("password hashing failed".into()))
}

/// A new argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`).
fn argon2_hash(password: &[u8], mem: &mut Vec<Block>) -> Result<String, StoreError> {
    let failed = || StoreError::Other("password hashing failed".into());
    let params = new_params();
    let salt = Salt::new(&rand::random::<[u8; 16]>()).map_err(|_| failed())?;
    let hash = argon2_into(
        Algorithm::Argon2id,
        Version::V0x13,
        params.clone(),
        password,
        &salt,
        mem,
    )?;
    let phc = PasswordHash {
        algorithm: ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|_| failed())?,
        salt: Some(salt),
        hash: Some(hash),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the argon2 PHC string `stored` (compared in constant time).
fn argon2_verify(password: &[u8], stored: &str, mem: &mut Vec<Block>) -> Result<bool, StoreError> {
    let Ok(phc) = PasswordHash::new(stored) else {
        return Ok(false);
    };
    let (Ok(alg), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(phc.algorithm.as_str()),
        Params::try_from(&phc),
        phc.salt.as_ref(),
        phc.hash.as_ref(),
    ) else {
        return Ok(false);
    };
    let ver = match phc.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return Ok(false),
    };
    let got = argon2_into(alg, ver, params, password, salt, mem)?;
    // `Output`'s equality is constant-time.
    Ok(&got == expected)
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

/// Runs argon2 on the blocking pool, at most one hash per core at a time, each in one of
/// `permits` memory blocks kept for the life of the process: ~19 MiB per core, however
/// many participants sign in (200 at once must not take 4 GiB, nor leave it behind).
#[derive(Debug, Clone)]
pub(crate) struct Hasher {
    gate: Arc<Semaphore>,
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
    /// Verified against when the user does not exist, so an unknown name costs about as
    /// much as a wrong password. Made on first use.
    dummy: Arc<OnceLock<String>>,
}

impl Hasher {
    pub(crate) fn new() -> Self {
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hasher {
            gate: Arc::new(Semaphore::new(permits)),
            memory: Arc::new(Mutex::new(Vec::new())),
            dummy: Arc::new(OnceLock::new()),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vec<Block>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| StoreError::Other("password hasher closed".into()))?;
        let memory = self.memory.clone();
        tokio::task::spawn_blocking(move || {
            // Holding a permit guarantees a free block or room for one more.
            let mut mem = lock(&memory).pop().unwrap_or_default();
            let r = f(&mut mem);
            lock(&memory).push(mem);
            r
        })
        .await
        .map_err(|_| StoreError::Other("password hashing task failed".into()))?
    }

    pub(crate) async fn hash(&self, password: &str) -> Result<String, StoreError> {
        let pw = password.to_owned();
        self.run(move |mem| argon2_hash(pw.as_bytes(), mem)).await
    }

    /// `stored: None` (unknown user) verifies against a dummy hash and answers `No`.
    pub(crate) async fn verify(
        &self,
        password: &str,
        stored: Option<String>,
    ) -> Result<Verified, StoreError> {
        let pw = password.to_owned();
        let dummy = self.dummy.clone();
        self.run(move |mem| {
            let Some(stored) = stored else {
                let d = match dummy.get() {
                    Some(d) => d,
                    None => {
                        let h = argon2_hash(&rand::random::<[u8; 16]>(), mem)?;
                        dummy.get_or_init(|| h)
                    }
                };
                let _ = argon2_verify(pw.as_bytes(), d, mem);
                return Ok(Verified::No);
            };
            match scheme_of(&stored) {
                Some(PasswordScheme::Argon2id) => {
                    if argon2_verify(pw.as_bytes(), &stored, mem)? {
                        Ok(Verified::Yes { rehash: None })
                    } else {
                        Ok(Verified::No)
                    }
                }
                Some(PasswordScheme::Bcrypt) => {
                    if bcrypt::verify(pw.as_bytes(), &stored).unwrap_or(false) {
                        Ok(Verified::Yes {
                            rehash: Some(argon2_hash(pw.as_bytes(), mem)?),
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

/// A poisoned lock only means a hash panicked; the blocks are still fine to reuse.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our hand-made PHC strings and the argon2 crate's own agree both ways, so hashes
    /// stored before the memory reuse still verify, and ours verify anywhere.
    #[test]
    fn phc_strings_match_the_argon2_crate() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let mut mem = Vec::new();
        let theirs = Argon2::default()
            .hash_password(b"secret")
            .unwrap()
            .to_string();
        assert!(argon2_verify(b"secret", &theirs, &mut mem).unwrap());
        assert!(!argon2_verify(b"Secret", &theirs, &mut mem).unwrap());
        let ours = argon2_hash(b"secret", &mut mem).unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        Argon2::default()
            .verify_password(b"secret", ours.as_str())
            .unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"other", ours.as_str())
                .is_err()
        );
        // Other parameters (argon2i, more passes, smaller memory) verify in the same block.
        let other = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x10,
            Params::new(1024, 3, 1, Some(24)).unwrap(),
        )
        .hash_password(b"secret")
        .unwrap()
        .to_string();
        assert!(argon2_verify(b"secret", &other, &mut mem).unwrap());
        assert!(!argon2_verify(b"secret2", &other, &mut mem).unwrap());
        // Garbage and greedy parameters never verify and never allocate.
        for bad in [
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$garbage",
            "$argon2x$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        ] {
            assert!(!argon2_verify(b"secret", bad, &mut mem).unwrap(), "{bad}");
        }
        let greedy = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2g";
        assert!(argon2_verify(b"secret", greedy, &mut mem).is_err());
        assert_eq!(mem.len(), Params::default().block_count());
    }

    /// However many hashes run, at most one memory block per permit is ever made.
    #[tokio::test]
    async fn memory_blocks_are_reused() {
        let h = Hasher::new();
        let permits = h.gate.available_permits();
        let phc = h.hash("pw").await.unwrap();
        let runs: Vec<_> = (0..3 * permits)
            .map(|_| {
                let (h, phc) = (h.clone(), phc.clone());
                tokio::spawn(async move { h.verify("pw", Some(phc)).await })
            })
            .collect();
        for r in runs {
            assert!(matches!(
                r.await.unwrap().unwrap(),
                Verified::Yes { rehash: None }
            ));
        }
        let blocks = lock(&h.memory);
        assert!(
            !blocks.is_empty() && blocks.len() <= permits,
            "{} blocks",
            blocks.len()
        );
    }

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
