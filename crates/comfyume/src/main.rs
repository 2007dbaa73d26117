//! `comfyume`: serve a workshop, manage its accounts and node definitions.

mod config;
mod logging;
mod serve;
mod telemetry;
mod users;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use comfyume_store::Store;

use config::{CommonArgs, ServeArgs};

#[derive(Parser)]
#[command(
    name = "comfyume",
    version,
    about = "ComfyUI workshops: one server, every participant their own ComfyUI"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing ServeArgs would only complicate clap.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start the workshop server.
    Serve(ServeArgs),
    /// Manage accounts.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage the node definitions snapshot.
    #[command(subcommand, name = "object-info")]
    ObjectInfo(ObjectInfoCmd),
    /// Manage the static ComfyUI frontend.
    #[command(subcommand)]
    Frontend(FrontendCmd),
    /// Print the example TOML configuration.
    DefaultConfig,
}

#[derive(Subcommand)]
enum FrontendCmd {
    /// Write .br/.gz copies of its text files, served instead of compressing per request
    /// (`serve` does this on its own at first start when the folder is writable).
    Precompress {
        /// Default: DATA_DIR/frontend/<version>.
        #[arg(long, env = "COMFYUME_FRONTEND_DIR")]
        frontend_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Add an account (a generated password is printed when none is given).
    Add {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts.
    List,
    /// Change a password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account (their files stay).
    Remove { name: String },
    /// Disable an account (sign-in refused, sessions end).
    Disable { name: String },
    /// Enable a disabled account.
    Enable { name: String },
    /// Import bcrypt entries from an nginx htpasswd file.
    ImportHtpasswd { file: PathBuf },
    /// Create user001..userNNN and print a credentials sheet.
    CreateWorkshop {
        #[arg(long, default_value_t = 20)]
        count: u32,
        #[arg(long, default_value = "user")]
        prefix: String,
        /// Also write the sheet as CSV to this file (mode 600).
        #[arg(long)]
        csv: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ObjectInfoCmd {
    /// Replace the snapshot with a ComfyUI /object_info JSON file.
    Import { file: PathBuf },
}

pub async fn open_store(data_dir: &std::path::Path) -> Result<Arc<dyn Store>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let store = comfyume_store::sqlite::SqliteStore::open(&data_dir.join("comfyume.db"))
        .await
        .with_context(|| format!("opening the database in {}", data_dir.display()))?;
    Ok(Arc::new(store))
}

fn main() -> Result<()> {
    // Real environment variables win over .env; a missing .env is fine.
    let _ = dotenvy::dotenv();
    // HTTPS to GPU backends uses rustls with the ring provider (no C toolchain
    // beyond what ring needs); installed once for the whole process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Serve(args) => serve::run(&common, &args).await,
        Command::Frontend(FrontendCmd::Precompress { frontend_dir }) => {
            let file = config::load_file(common.config.as_deref())?;
            let dir = config::frontend_dir(
                frontend_dir.as_ref(),
                &file,
                &config::data_dir(&common, &file),
            );
            let started = std::time::Instant::now();
            let s = comfyume_gateway::precompress::precompress(&dir)
                .with_context(|| format!("precompressing {}", dir.display()))?;
            println!(
                "{}: {} compressed ({} KiB -> br {} KiB, gz {} KiB), {} already up to date, {:.1} s",
                dir.display(),
                s.compressed,
                s.bytes / 1024,
                s.br_bytes / 1024,
                s.gz_bytes / 1024,
                s.up_to_date,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", config::EXAMPLE_TOML);
            Ok(())
        }
        Command::Users(cmd) => {
            let file = config::load_file(common.config.as_deref())?;
            let store = open_store(&config::data_dir(&common, &file)).await?;
            let store = store.as_ref();
            match cmd {
                UsersCmd::Add {
                    name,
                    admin,
                    password_stdin,
                } => {
                    let pw = if password_stdin {
                        Some(users::read_password_stdin()?)
                    } else {
                        None
                    };
                    users::add(store, &name, admin, pw).await
                }
                UsersCmd::List => users::list(store).await,
                UsersCmd::Passwd {
                    name,
                    password_stdin,
                } => {
                    let pw = if password_stdin {
                        Some(users::read_password_stdin()?)
                    } else {
                        None
                    };
                    users::passwd(store, &name, pw).await
                }
                UsersCmd::Remove { name } => users::remove(store, &name).await,
                UsersCmd::Disable { name } => users::set_disabled(store, &name, true).await,
                UsersCmd::Enable { name } => users::set_disabled(store, &name, false).await,
                UsersCmd::ImportHtpasswd { file } => users::import_htpasswd(store, &file).await,
                UsersCmd::CreateWorkshop { count, prefix, csv } => {
                    users::create_workshop(store, count, &prefix, csv.as_deref())
                        .await
                        .map(|_| ())
                }
            }
        }
        Command::ObjectInfo(ObjectInfoCmd::Import { file }) => {
            let cfg = config::load_file(common.config.as_deref())?;
            let store = open_store(&config::data_dir(&common, &cfg)).await?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let Some(map) = value.as_object() else {
                anyhow::bail!(
                    "{} is not a ComfyUI object_info document (expected a JSON object)",
                    file.display()
                );
            };
            if let Some((k, _)) = map
                .iter()
                .find(|(_, v)| v.get("input").is_none() || v.get("output").is_none())
            {
                anyhow::bail!(
                    "{}: node '{k}' lacks 'input'/'output'; not an object_info document",
                    file.display()
                );
            }
            store
                .put_meta(
                    comfyume_gateway::OBJECT_INFO_KEY,
                    &value.to_string(),
                    &format!("import:{}", file.display()),
                )
                .await?;
            println!(
                "imported {} node definitions (a running server picks them up at its next start)",
                map.len()
            );
            Ok(())
        }
    }
}
