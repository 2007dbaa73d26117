//! A participant's folders, and the workshop templates copied into their
//! `workflows/` on first login (never overwriting their own edits).

use std::io;

use crate::state::AppState;

const PROVISIONED_KEY: &str = "provisioned:";

pub async fn ensure_user(state: &AppState, user: &str) -> io::Result<()> {
    if state.auth_known(user) {
        return Ok(());
    }
    let dirs = state.user_dirs(user);
    for d in [&dirs.user_data, &dirs.inputs, &dirs.outputs, &dirs.temp] {
        tokio::fs::create_dir_all(d).await?;
    }
    let workflows = dirs.user_data.join("workflows");
    tokio::fs::create_dir_all(&workflows).await?;
    let key = format!("{PROVISIONED_KEY}{user}");
    let done = state
        .store
        .get_meta(&key)
        .await
        .map_err(io::Error::other)?
        .is_some();
    if !done {
        for t in comfyume_templates::all() {
            let path = workflows.join(t.file_name);
            // create_new: a participant's own file of the same name wins.
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(mut f) => {
                    use tokio::io::AsyncWriteExt;
                    f.write_all(t.json.as_bytes()).await?;
                    f.sync_all().await?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        state
            .store
            .put_meta(&key, "templates", "first-login")
            .await
            .map_err(io::Error::other)?;
        tracing::info!(user, "prepared a new participant's workspace");
    }
    state.mark_known(user);
    Ok(())
}
