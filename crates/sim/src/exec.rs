//! The prompt worker: takes queue items one at a time and "executes" them with ComfyUI's
//! message sequence (see PROTOCOL.md §4 and traces/ws_owner.txt).

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::catalog::Catalog;
use crate::imaging;
use crate::nodes::{self, Arg, Args, Data, NodeCtx, NodeError, NodeOut};
use comfyume_wire::shapes::executed as ws_executed;
use comfyume_wire::shapes::{
    ExecStatus, ExecutionErrorInfo, HistoryRecord, NodeProgress, StatusStr, executing,
    executing_done, execution_cached, execution_error, execution_interrupted, execution_start,
    execution_success, history_item, meta_entry, preview_metadata, progress, progress_state,
    to_python_json,
};
use serde_json::Number;

use crate::state::{CacheEntry, CurrentJobInner, PreviewPhase, QueueItem, Shared, lock, now_ms};

/// The prompt worker loop. Returns on shutdown; is aborted when the server dies.
pub async fn worker(shared: Arc<Shared>) {
    loop {
        if shared.shutdown.is_cancelled() || shared.root.is_cancelled() {
            return;
        }
        shared.wait_not_hung().await;
        let next = {
            let mut inner = lock(&shared.inner);
            match inner.next_index() {
                Some(i) => {
                    let item = inner.pending.remove(i);
                    inner.running = Some(item.clone());
                    inner.exec_client = item.client_id();
                    inner.last_node = None;
                    // queue.get() calls queue_updated(): same number, now counting the running item.
                    shared.broadcast_status(&inner);
                    Some(item)
                }
                None => None,
            }
        };
        match next {
            Some(item) => {
                if run_job(&shared, item).await.is_err() {
                    return;
                }
            }
            None => {
                tokio::select! {
                    _ = shared.work.notified() => {}
                    _ = shared.shutdown.cancelled() => return,
                    _ = shared.root.cancelled() => return,
                }
            }
        }
    }
}

/// The server died during the job.
#[derive(Debug)]
pub struct Died;

#[derive(Debug, Clone)]
struct Progress {
    node: String,
    state: &'static str,
    value: Number,
    max: Number,
}

fn float(x: f64) -> Number {
    Number::from_f64(x).unwrap_or_else(|| Number::from(0))
}

struct Job<'a> {
    shared: &'a Arc<Shared>,
    prompt_id: String,
    client: Option<String>,
    messages: Vec<(String, Value)>,
    progress: Vec<Progress>,
}

impl Job<'_> {
    fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }

    /// `add_message`: recorded in history; sent to the client (or broadcast when `broadcast`).
    fn add_message(&mut self, message: Value, broadcast: bool) {
        if self.client.is_some() || broadcast {
            self.shared.send(self.client.as_deref(), &message);
        }
        if let Value::Object(mut m) = message {
            let event = match m.remove("type") {
                Some(Value::String(t)) => t,
                _ => String::new(),
            };
            let data = m.remove("data").unwrap_or(Value::Null);
            self.messages.push((event, data));
        }
    }

    /// Execution messages reach only the submitting client; without one nobody gets them.
    fn exec_msg(&self, message: &Value) {
        if let Some(c) = self.client() {
            self.shared.send(Some(c), message);
        }
    }

    fn entry(&mut self, node: &str) -> &mut Progress {
        if let Some(i) = self.progress.iter().position(|p| p.node == node) {
            return &mut self.progress[i];
        }
        self.progress.push(Progress {
            node: node.to_string(),
            state: "pending",
            value: Number::from(0),
            max: Number::from(1),
        });
        self.progress.last_mut().expect("just pushed")
    }

    fn send_progress_state(&self) {
        let nodes: Vec<NodeProgress> = self
            .progress
            .iter()
            .filter(|p| p.state != "pending")
            .map(|p| NodeProgress {
                value: p.value.clone(),
                max: p.max.clone(),
                running: p.state == "running",
                ..NodeProgress::started(&p.node)
            })
            .collect();
        self.shared
            .send(self.client(), &progress_state(&self.prompt_id, &nodes));
    }

    fn progress_start(&mut self, node: &str) {
        let e = self.entry(node);
        e.state = "running";
        e.value = float(0.0);
        e.max = float(1.0);
        self.send_progress_state();
    }

    fn progress_update(&mut self, node: &str, value: u32, max: u32) {
        let e = self.entry(node);
        e.state = "running";
        e.value = Number::from(value);
        e.max = Number::from(max);
        self.send_progress_state();
    }

    fn progress_finish(&mut self, node: &str) {
        let e = self.entry(node);
        e.state = "finished";
        e.value = e.max.clone();
        self.send_progress_state();
    }

    /// A point inside the job where faults act: hang waits, die stops, drop-websocket fires.
    async fn checkpoint(&self) -> Result<(), NodeError> {
        self.shared.wait_not_hung().await;
        let faults = self.shared.faults.borrow().clone();
        if faults.die_mid_job {
            self.shared.faults.send_modify(|f| f.die_mid_job = false);
            self.shared.die();
            return Err(NodeError::Died);
        }
        if faults.drop_websocket {
            self.shared.faults.send_modify(|f| f.drop_websocket = false);
            tracing::warn!(prompt_id = %self.prompt_id, "dropping every WebSocket mid-job (fault)");
            self.shared.drop_all_ws();
        }
        if self.shared.root.is_cancelled() {
            return Err(NodeError::Died);
        }
        Ok(())
    }

    /// `throw_exception_if_processing_interrupted`: the flag is consumed when it fires.
    fn interrupted(&self) -> bool {
        self.shared.interrupt.swap(false, Ordering::SeqCst)
    }
}

fn is_link(v: &Value) -> Option<(&str, i64)> {
    let arr = v.as_array()?;
    if arr.len() != 2 {
        return None;
    }
    let from = arr[0].as_str()?;
    let slot = arr[1]
        .as_i64()
        .or_else(|| arr[1].as_f64().map(|f| f as i64))?;
    Some((from, slot))
}

fn node_inputs(prompt: &Map<String, Value>, id: &str) -> Vec<(String, Value)> {
    prompt
        .get(id)
        .and_then(|n| n.get("inputs"))
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn class_of<'p>(prompt: &'p Map<String, Value>, id: &str) -> &'p str {
    prompt
        .get(id)
        .and_then(|n| n.get("class_type"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// ComfyUI's `ExecutionList`: which node runs next, including its "UX friendly" preference for
/// output nodes and the nodes that feed them.
struct ExecList<'a> {
    prompt: &'a Map<String, Value>,
    catalog: &'a Catalog,
    cached: &'a HashSet<String>,
    pending: Vec<String>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, Vec<String>>,
}

impl<'a> ExecList<'a> {
    fn new(
        prompt: &'a Map<String, Value>,
        catalog: &'a Catalog,
        cached: &'a HashSet<String>,
    ) -> Self {
        Self {
            prompt,
            catalog,
            cached,
            pending: Vec::new(),
            block_count: HashMap::new(),
            blocking: HashMap::new(),
        }
    }

    fn add_node(&mut self, id: &str) {
        let mut stack = vec![id.to_string()];
        let mut links = Vec::new();
        while let Some(u) = stack.pop() {
            if self.pending.contains(&u) {
                continue;
            }
            self.pending.push(u.clone());
            self.block_count.insert(u.clone(), 0);
            self.blocking.insert(u.clone(), Vec::new());
            for (_, value) in node_inputs(self.prompt, &u) {
                if let Some((from, _)) = is_link(&value) {
                    if !self.cached.contains(from) {
                        stack.push(from.to_string());
                    }
                    links.push((from.to_string(), u.clone()));
                }
            }
        }
        for (from, to) in links {
            if self.cached.contains(&from) {
                continue;
            }
            self.add_node(&from);
            let blocked = self.blocking.entry(from).or_default();
            if !blocked.contains(&to) {
                blocked.push(to.clone());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn is_output(&self, id: &str) -> bool {
        self.catalog.is_output(class_of(self.prompt, id))
    }

    /// `stage_node_execution` + `ux_friendly_pick_node`; `None` on a dependency cycle.
    fn stage(&self) -> Option<String> {
        let available: Vec<&String> = self
            .pending
            .iter()
            .filter(|n| self.block_count.get(*n).copied().unwrap_or(0) == 0)
            .collect();
        let blocked_by = |n: &str| self.blocking.get(n).cloned().unwrap_or_default();
        if let Some(n) = available.iter().find(|n| self.is_output(n)) {
            return Some((*n).clone());
        }
        if let Some(n) = available
            .iter()
            .find(|n| blocked_by(n).iter().any(|b| self.is_output(b)))
        {
            return Some((*n).clone());
        }
        if let Some(n) = available.iter().find(|n| {
            blocked_by(n)
                .iter()
                .any(|b| blocked_by(b).iter().any(|b1| self.is_output(b1)))
        }) {
            return Some((*n).clone());
        }
        available.first().map(|n| (*n).clone())
    }

    fn complete(&mut self, id: &str) {
        self.pending.retain(|n| n != id);
        for to in self.blocking.remove(id).unwrap_or_default() {
            if let Some(c) = self.block_count.get_mut(&to) {
                *c = c.saturating_sub(1);
            }
        }
    }
}

/// Cache keys: class, widget values and (recursively) the keys of linked nodes, plus the file
/// hash for LoadImage (its IS_CHANGED).
fn signatures(shared: &Shared, prompt: &Map<String, Value>) -> HashMap<String, String> {
    fn sig(
        shared: &Shared,
        prompt: &Map<String, Value>,
        id: &str,
        memo: &mut HashMap<String, String>,
        visiting: &mut HashSet<String>,
    ) -> String {
        if let Some(s) = memo.get(id) {
            return s.clone();
        }
        if !prompt.contains_key(id) || !visiting.insert(id.to_string()) {
            return format!("unresolvable:{id}");
        }
        let class = class_of(prompt, id).to_string();
        let mut inputs: Vec<(String, Value)> = node_inputs(prompt, id);
        inputs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut parts = Vec::new();
        for (name, value) in inputs {
            let v = match is_link(&value) {
                Some((from, slot)) => {
                    json!(["link", sig(shared, prompt, from, memo, visiting), slot])
                }
                None => value,
            };
            parts.push(json!([name, v]));
        }
        let changed = if shared.catalog.builtin && class == "LoadImage" {
            let name = prompt[id]["inputs"]["image"].as_str().unwrap_or_default();
            let (base, dir) = shared.dirs.annotated(name);
            let dir = dir.unwrap_or(&shared.dirs.input);
            std::fs::read(dir.join(base))
                .map(|b| hex::encode(Sha256::digest(&b)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let text = to_python_json(&json!([class, changed, parts]));
        let s = hex::encode(Sha256::digest(text.as_bytes()));
        visiting.remove(id);
        memo.insert(id.to_string(), s.clone());
        s
    }
    let mut memo = HashMap::new();
    let mut visiting = HashSet::new();
    for id in prompt.keys() {
        sig(shared, prompt, id, &mut memo, &mut visiting);
    }
    memo
}

enum Outcome {
    Success,
    Interrupted {
        node: String,
    },
    Error {
        node: String,
        exception_type: String,
        message: String,
        inputs: Value,
    },
}

fn png_text(item: &QueueItem) -> Vec<(String, String)> {
    let mut out = vec![(
        "prompt".to_string(),
        to_python_json(&Value::Object(item.prompt.clone())),
    )];
    if let Some(Value::Object(extra)) = item.extra_data.get("extra_pnginfo") {
        for (k, v) in extra {
            out.push((k.clone(), to_python_json(v)));
        }
    }
    out
}

async fn run_job(shared: &Arc<Shared>, item: QueueItem) -> Result<(), Died> {
    let started = Instant::now();
    {
        let mut stats = lock(&shared.stats);
        stats.jobs_run += 1;
        stats.current = Some(CurrentJobInner {
            prompt_id: item.prompt_id.clone(),
            number: item.number.clone(),
            started,
            node: None,
        });
    }
    tracing::info!(prompt_id = %item.prompt_id, "job started");
    // `nodes.interrupt_processing(False)` at the start of every execution.
    shared.interrupt.store(false, Ordering::SeqCst);
    let mut job = Job {
        shared,
        prompt_id: item.prompt_id.clone(),
        client: item.client_id(),
        messages: Vec::new(),
        progress: Vec::new(),
    };
    job.add_message(execution_start(&item.prompt_id, now_ms()), false);

    let prompt = &item.prompt;
    let sigs = signatures(shared, prompt);
    let mut values: HashMap<String, Arc<Vec<Data>>> = HashMap::new();
    let mut cached_ui: HashMap<String, Option<Value>> = HashMap::new();
    let mut cached_nodes = Vec::new();
    if shared.cache_enabled {
        let inner = lock(&shared.inner);
        for id in prompt.keys() {
            if let Some(entry) = sigs.get(id).and_then(|s| inner.cache.get(s)) {
                cached_nodes.push(id.clone());
                values.insert(id.clone(), entry.values.clone());
                cached_ui.insert(id.clone(), entry.ui.clone());
            }
        }
    }
    job.add_message(
        execution_cached(&cached_nodes, &item.prompt_id, now_ms()),
        false,
    );
    let cached: HashSet<String> = cached_nodes.iter().cloned().collect();
    let mut list = ExecList::new(prompt, &shared.catalog, &cached);
    for o in &item.outputs {
        list.add_node(o);
    }
    let text = png_text(&item);
    let whole_prompt = Arc::new(item.prompt.clone());
    let mut executed: Vec<String> = Vec::new();
    let mut ui_outputs: Vec<(String, Value)> = Vec::new();

    let outcome = loop {
        if list.is_empty() {
            break Outcome::Success;
        }
        let Some(node) = list.stage() else {
            let node = list.pending.first().cloned().unwrap_or_default();
            break Outcome::Error {
                node,
                exception_type: "RuntimeError".into(),
                message: "Dependency cycle detected".into(),
                inputs: json!({}),
            };
        };
        if cached.contains(&node) {
            let ui = cached_ui.get(&node).cloned().flatten();
            let output = ui.clone().unwrap_or(Value::Null);
            job.exec_msg(&ws_executed(&node, &node, &output, &item.prompt_id));
            if let Some(ui) = ui {
                ui_outputs.push((node.clone(), ui));
            }
            job.progress_finish(&node);
            list.complete(&node);
            executed.push(node);
            continue;
        }
        job.progress_start(&node);
        {
            let mut inner = lock(&shared.inner);
            inner.last_node = Some(node.clone());
            if let Some(c) = lock(&shared.stats).current.as_mut() {
                c.node = Some(node.clone());
            }
        }
        job.exec_msg(&executing(&node, &node, &item.prompt_id));
        let args = resolve_args(prompt, &node, &values);
        let ctx = NodeCtx {
            node_id: node.clone(),
            class_type: class_of(prompt, &node).to_string(),
            output_dir: shared.dirs.output.clone(),
            temp_dir: shared.dirs.temp.clone(),
            input_dir: shared.dirs.input.clone(),
            png_text: text.clone(),
            prompt: whole_prompt.clone(),
        };
        match execute_node(&mut job, &ctx, &args).await {
            Ok(out) => {
                values.insert(node.clone(), Arc::new(out.values));
                if let Some(ui) = out.ui {
                    job.exec_msg(&ws_executed(&node, &node, &ui, &item.prompt_id));
                    ui_outputs.push((node.clone(), ui));
                }
                job.progress_finish(&node);
                list.complete(&node);
                executed.push(node);
            }
            Err(NodeError::Died) => return Err(Died),
            Err(NodeError::Interrupted) => break Outcome::Interrupted { node },
            Err(NodeError::Runtime {
                exception_type,
                message,
            }) => {
                break Outcome::Error {
                    node,
                    exception_type,
                    message,
                    inputs: args.formatted(),
                };
            }
        }
    };

    // ComfyUI reports `executed` as a set; most recent first matches the captures.
    let executed_list: Vec<String> = executed.iter().rev().cloned().collect();
    let (status_str, completed) = match &outcome {
        Outcome::Success => {
            job.add_message(execution_success(&item.prompt_id, now_ms()), false);
            (StatusStr::Success, true)
        }
        Outcome::Interrupted { node } => {
            tracing::info!(prompt_id = %item.prompt_id, node, "job interrupted");
            let message = execution_interrupted(
                &item.prompt_id,
                node,
                class_of(prompt, node),
                &executed_list,
                now_ms(),
            );
            job.add_message(message, true);
            (StatusStr::Error, false)
        }
        Outcome::Error {
            node,
            exception_type,
            message,
            inputs,
        } => {
            tracing::info!(prompt_id = %item.prompt_id, node, %message, "job failed");
            let info = ExecutionErrorInfo {
                prompt_id: item.prompt_id.clone(),
                node_id: node.clone(),
                node_type: class_of(prompt, node).to_string(),
                executed: executed_list,
                exception_message: format!("{message}\n"),
                exception_type: exception_type.clone(),
                traceback: vec![
                    "  File \"comfyume-sim\", in execute (simulated server; no Python traceback)\n"
                        .into(),
                    format!(
                        "  node {node} ({}) raised {exception_type}\n",
                        class_of(prompt, node)
                    ),
                ],
                current_inputs: inputs.clone(),
                current_outputs: prompt.keys().cloned().collect(),
            };
            job.add_message(execution_error(&info, now_ms()), false);
            (StatusStr::Error, false)
        }
    };

    let mut outputs = Map::new();
    let mut meta = Map::new();
    for (node, ui) in &ui_outputs {
        outputs.insert(node.clone(), ui.clone());
        meta.insert(node.clone(), meta_entry(node, node, None, node));
    }
    let entry = history_item(&HistoryRecord {
        number: item.number.clone(),
        prompt_id: item.prompt_id.clone(),
        prompt: Value::Object(item.prompt.clone()),
        extra_data: Value::Object(item.extra_data.clone()),
        outputs_to_execute: item.outputs.clone(),
        outputs,
        status: Some(ExecStatus {
            status_str,
            completed,
            messages: std::mem::take(&mut job.messages),
        }),
        meta,
    });

    let elapsed = started.elapsed();
    let forget = shared.faults.borrow().forget_next_history;
    if forget {
        shared.faults.send_modify(|f| f.forget_next_history = false);
        tracing::warn!(prompt_id = %item.prompt_id, "not keeping the job in the history (fault)");
    }
    {
        let mut inner = lock(&shared.inner);
        if !forget {
            inner.add_history(item.prompt_id.clone(), entry);
        }
        inner.running = None;
        inner.exec_client = None;
        inner.last_node = None;
        if shared.cache_enabled {
            let ui_map: HashMap<&String, &Value> = ui_outputs.iter().map(|(k, v)| (k, v)).collect();
            let mut cache = HashMap::new();
            for (id, sig) in &sigs {
                if let Some(v) = values.get(id) {
                    cache.insert(
                        sig.clone(),
                        CacheEntry {
                            values: v.clone(),
                            ui: ui_map.get(id).map(|u| (*u).clone()),
                        },
                    );
                }
            }
            inner.cache = cache;
        }
        {
            let mut stats = lock(&shared.stats);
            stats.busy += elapsed;
            stats.current = None;
            match &outcome {
                Outcome::Success => stats.jobs_succeeded += 1,
                Outcome::Interrupted { .. } => stats.jobs_interrupted += 1,
                Outcome::Error { .. } => stats.jobs_failed += 1,
            }
        }
        shared.broadcast_status(&inner);
    }
    job.exec_msg(&executing_done(&item.prompt_id));
    tracing::info!(prompt_id = %item.prompt_id, status_str = status_str.as_str(), ms = elapsed.as_millis() as u64, "job done");
    Ok(())
}

fn resolve_args(
    prompt: &Map<String, Value>,
    id: &str,
    values: &HashMap<String, Arc<Vec<Data>>>,
) -> Args {
    let mut args = Vec::new();
    for (name, value) in node_inputs(prompt, id) {
        let arg = match is_link(&value) {
            Some((from, slot)) => {
                let data = values.get(from).and_then(|outs| {
                    let idx = if slot < 0 {
                        outs.len() as i64 + slot
                    } else {
                        slot
                    };
                    usize::try_from(idx).ok().and_then(|i| outs.get(i)).cloned()
                });
                match data {
                    Some(d) => Arg::Data(d),
                    None => continue,
                }
            }
            None => Arg::Lit(value),
        };
        args.push((name, arg));
    }
    Args(args)
}

async fn sleep_units(step_ms: u64, units: u64) {
    let ms = step_ms.saturating_mul(units);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Run one node: the interrupt check at its start, simulated time, real work off the runtime.
async fn execute_node(job: &mut Job<'_>, ctx: &NodeCtx, args: &Args) -> Result<NodeOut, NodeError> {
    job.checkpoint().await?;
    if job.interrupted() {
        return Err(NodeError::Interrupted);
    }
    let shared = job.shared;
    let builtin = shared.catalog.builtin;
    let class = ctx.class_type.clone();

    let outputs = shared.catalog.output_types(&class);
    let sampled = if nodes::is_sampler(builtin, &class, &outputs) {
        let plan = nodes::sampler_plan(&class, args, 20)?;
        run_steps(
            job,
            &ctx.node_id,
            plan.steps,
            &plan.preview_base,
            plan.latent.sampled.as_ref().map_or(0, |s| s.seed),
        )
        .await?;
        Some(plan.latent)
    } else {
        sleep_units(shared.step_ms, nodes::slow_units(&class, args)).await;
        None
    };

    if builtin && let Some(latent) = sampled {
        // KSampler has one LATENT output; SamplerCustomAdvanced two (output, denoised_output).
        let l = Arc::new(latent);
        return Ok(NodeOut {
            values: outputs.iter().map(|_| Data::Latent(l.clone())).collect(),
            ui: None,
        });
    }
    let ctx = ctx.clone();
    let args = args.clone();
    let is_output = shared.catalog.is_output(&class);
    let result = tokio::task::spawn_blocking(move || {
        if builtin {
            nodes::run_builtin(&ctx, &ctx.class_type, &args)
        } else {
            nodes::run_generic(&ctx, &outputs, is_output, &args, sampled.as_ref())
        }
    })
    .await;
    match result {
        Ok(r) => r,
        Err(e) => Err(NodeError::runtime(format!("node panicked: {e}"))),
    }
}

/// A sampler's step loop: per step `progress_state`, a preview frame and `progress`, with the
/// interrupt checked in the progress hook like ComfyUI does.
async fn run_steps(
    job: &mut Job<'_>,
    node: &str,
    steps: u32,
    base: &image::RgbImage,
    seed: u64,
) -> Result<(), NodeError> {
    let step_ms = job.shared.step_ms;
    for step in 1..=steps {
        sleep_units(step_ms, 1).await;
        if step_ms == 0 {
            tokio::task::yield_now().await;
        }
        job.checkpoint().await?;
        if job.interrupted() {
            return Err(NodeError::Interrupted);
        }
        job.progress_update(node, step, steps);
        let amount = 1.0 - step as f32 / steps as f32;
        let preview = imaging::jpeg(&imaging::noisy(base, seed ^ u64::from(step), amount), 80);
        let metadata = preview_metadata(node, &job.prompt_id, node, None, node, "image/jpeg");
        job.shared.send_preview(
            job.client(),
            PreviewPhase::WithMetadata,
            &preview,
            &metadata,
        );
        let message = progress(u64::from(step), u64::from(steps), &job.prompt_id, node);
        job.shared.send(job.client(), &message);
        job.shared
            .send_preview(job.client(), PreviewPhase::Legacy, &preview, &metadata);
    }
    Ok(())
}
