//! `comfyume users …`: accounts, the workshop credentials sheet, htpasswd import.

use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use comfyume_store::{Role, Store, StoreError};
use rand::Rng;

/// Readable generated passwords: no 0/O, 1/l/I look-alikes.
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";

pub fn generate_password() -> String {
    let mut rng = rand::rng();
    let raw: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{}-{}-{}", &raw[0..4], &raw[4..8], &raw[8..12])
}

pub fn read_password_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the password from stdin")?;
    let p = s.trim_end_matches(['\n', '\r']).to_string();
    if p.is_empty() {
        bail!("the password on stdin is empty");
    }
    Ok(p)
}

pub fn check_name(name: &str) -> Result<()> {
    // Without regard to case: `ADMIN` or `Api` would read as the route to a person.
    if comfyume_gateway::scope::is_reserved_name(&name.to_ascii_lowercase()) {
        bail!(
            "'{name}' cannot be an account name: it is a route of the server (or contains a dot)"
        );
    }
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!("account names use letters, digits, '-' and '_' (at most 64), e.g. user001");
    }
    Ok(())
}

pub async fn add(
    store: &dyn Store,
    name: &str,
    admin: bool,
    password: Option<String>,
) -> Result<()> {
    check_name(name)?;
    let generated = password.is_none();
    let password = password.unwrap_or_else(generate_password);
    let role = if admin {
        Role::Admin
    } else {
        Role::Participant
    };
    match store.create_user(name, &password, role).await {
        Ok(u) => {
            println!("created {} ({})", u.name, u.role.as_str());
            if generated {
                println!("password: {password}");
            }
            Ok(())
        }
        Err(StoreError::AlreadyExists) => {
            bail!("account '{name}' already exists (names are compared without regard to case)")
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn list(store: &dyn Store) -> Result<()> {
    let users = store.list_users().await?;
    println!("{:<24} {:<12} {:<9} last login", "name", "role", "status");
    for u in users {
        let last = u
            .last_login_ms
            .map(format_ms)
            .unwrap_or_else(|| "never".into());
        let status = if u.disabled { "disabled" } else { "active" };
        println!(
            "{:<24} {:<12} {:<9} {last}",
            u.name,
            u.role.as_str(),
            status
        );
    }
    Ok(())
}

fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

pub async fn passwd(store: &dyn Store, name: &str, password: Option<String>) -> Result<()> {
    let generated = password.is_none();
    let password = password.unwrap_or_else(generate_password);
    match store.set_password(name, &password).await {
        Ok(()) => {
            println!("password changed for {name}");
            if generated {
                println!("password: {password}");
            }
            Ok(())
        }
        Err(StoreError::NotFound) => bail!("no account named '{name}'"),
        Err(e) => Err(e.into()),
    }
}

pub async fn remove(store: &dyn Store, name: &str) -> Result<()> {
    match store.remove_user(name).await {
        Ok(()) => {
            println!("removed {name} (their files stay in the data directory)");
            Ok(())
        }
        Err(StoreError::NotFound) => bail!("no account named '{name}'"),
        Err(e) => Err(e.into()),
    }
}

pub async fn set_disabled(store: &dyn Store, name: &str, disabled: bool) -> Result<()> {
    match store.set_disabled(name, disabled).await {
        Ok(()) => {
            println!("{} {name}", if disabled { "disabled" } else { "enabled" });
            Ok(())
        }
        Err(StoreError::NotFound) => bail!("no account named '{name}'"),
        Err(e) => Err(e.into()),
    }
}

/// Imports bcrypt entries of an nginx htpasswd file. Other schemes (MD5-crypt,
/// SHA1) are too weak to keep and are reported, not imported.
pub async fn import_htpasswd(store: &dyn Store, file: &Path) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let (mut imported, mut skipped) = (0, 0);
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            eprintln!("line {}: not 'name:hash', skipped", n + 1);
            skipped += 1;
            continue;
        };
        if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
            eprintln!(
                "line {}: {name}: not a bcrypt hash (only bcrypt entries are imported), skipped",
                n + 1
            );
            skipped += 1;
            continue;
        }
        if let Err(e) = check_name(name) {
            eprintln!("line {}: {e}, skipped", n + 1);
            skipped += 1;
            continue;
        }
        match store.import_bcrypt(name, hash, Role::Participant).await {
            Ok(_) => imported += 1,
            Err(StoreError::AlreadyExists) => {
                eprintln!("line {}: {name} already exists, skipped", n + 1);
                skipped += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!("imported {imported} account(s), skipped {skipped}");
    Ok(())
}

/// Writes a file only its owner can read, from its first byte on (a plain write
/// followed by chmod leaves the passwords world-readable for a moment).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let mut f = opts.open(path)?;
        // An existing file keeps its old mode on open: narrow it before writing.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut f = opts.open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    }
}

/// Creates `user001`..`userNNN` and prints a credentials sheet (table and CSV).
pub async fn create_workshop(
    store: &dyn Store,
    count: u32,
    prefix: &str,
    csv_out: Option<&Path>,
) -> Result<Vec<(String, String)>> {
    if count == 0 || count > 999 {
        bail!("--count must be between 1 and 999");
    }
    let mut created = Vec::new();
    for i in 1..=count {
        let name = format!("{prefix}{i:03}");
        check_name(&name)?;
        let password = generate_password();
        match store.create_user(&name, &password, Role::Participant).await {
            Ok(_) => created.push((name, password)),
            Err(StoreError::AlreadyExists) => eprintln!("{name} already exists, left as it is"),
            Err(e) => return Err(e.into()),
        }
    }
    println!("{:<12} {:<16} url", "username", "password");
    for (u, p) in &created {
        println!("{u:<12} {p:<16} /{u}/");
    }
    let mut csv = String::from("username,password,url\n");
    for (u, p) in &created {
        csv.push_str(&format!("{u},{p},/{u}/\n"));
    }
    println!("\n{csv}");
    if let Some(path) = csv_out {
        write_private(path, &csv).with_context(|| format!("writing {}", path.display()))?;
        println!("credentials written to {}", path.display());
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_readable_and_distinct() {
        let a = generate_password();
        assert_eq!(a.len(), 14);
        assert!(a.chars().all(|c| c == '-' || ALPHABET.contains(&(c as u8))));
        assert_ne!(a, generate_password());
    }

    #[test]
    fn names_must_not_shadow_routes() {
        assert!(check_name("user001").is_ok());
        assert!(check_name("api").is_err());
        for shouty in ["ADMIN", "Api", "Login", "METRICS", "Assets"] {
            assert!(check_name(shouty).is_err(), "{shouty}");
        }
        assert!(check_name("assets").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
    }
}
