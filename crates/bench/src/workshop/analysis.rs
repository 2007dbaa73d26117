//! What the run's records mean (pure): the simulators' logs read back into
//! executions per job (was any job run twice?), Jain's fairness index per
//! window, and the end states of the jobs.

use std::collections::{BTreeMap, HashMap};

/// One backend process: simulator `sim`, its `incarnation`-th start.
pub type Process = (usize, usize);

/// A line of a simulator's log about one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct SimEvent {
    pub at_ms: i64,
    pub prompt_id: String,
    pub kind: SimEventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimEventKind {
    /// `POST /prompt` accepted.
    Queued,
    /// The worker began executing it.
    Started,
    /// It ended: `status_str="success"` or not.
    Done {
        success: bool,
    },
    Interrupted,
    Failed,
}

/// Removes ANSI colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `2026-12-06T16:48:05.581524Z` as ms since the Unix epoch (UTC only).
pub fn parse_utc_ms(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec = t.next()?;
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, "0"));
    let ss: i64 = whole.parse().ok()?;
    let frac_ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + frac_ms)
}

/// The prompt events of one simulator log (tracing's default format, colours or not).
pub fn parse_sim_log(text: &str) -> Vec<SimEvent> {
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = strip_ansi(raw);
        let Some(at_ms) = line.split_whitespace().next().and_then(parse_utc_ms) else {
            continue;
        };
        let Some(id) = field(&line, "prompt_id") else {
            continue;
        };
        let kind = if line.contains(" prompt queued") {
            SimEventKind::Queued
        } else if line.contains(" job started") {
            SimEventKind::Started
        } else if line.contains(" job done") {
            SimEventKind::Done {
                success: field(&line, "status_str").as_deref() == Some("success"),
            }
        } else if line.contains(" job interrupted") {
            SimEventKind::Interrupted
        } else if line.contains(" job failed") {
            SimEventKind::Failed
        } else {
            continue;
        };
        out.push(SimEvent {
            at_ms,
            prompt_id: id,
            kind,
        });
    }
    out
}

/// The value of ` name=value` (quotes removed).
fn field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    let v = if let Some(q) = rest.strip_prefix('"') {
        &q[..q.find('"')?]
    } else {
        rest.split_whitespace().next()?
    };
    Some(v.to_string())
}

/// How one execution of a job on a backend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEnd {
    Success,
    Error,
    Interrupted,
    /// The process was killed while it ran the job.
    Killed,
    /// Still running when the log ends.
    Open,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub process: Process,
    pub start_ms: i64,
    pub end_ms: i64,
    pub end: ExecEnd,
}

/// Per job: how often a backend accepted its `POST /prompt`, and its executions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOnBackends {
    pub posts: usize,
    pub executions: Vec<Execution>,
}

/// Reads the logs of every backend process into per-job executions. `killed`
/// gives when a process was SIGKILLed (its running job ends then).
pub fn executions(
    logs: &[(Process, Vec<SimEvent>)],
    killed: &HashMap<Process, i64>,
) -> BTreeMap<String, JobOnBackends> {
    let mut jobs: BTreeMap<String, JobOnBackends> = BTreeMap::new();
    for (process, events) in logs {
        // A simulator runs one job at a time: a start is closed by the next end of that job.
        let mut open: HashMap<String, i64> = HashMap::new();
        for e in events {
            let job = jobs.entry(e.prompt_id.clone()).or_default();
            let end = match e.kind {
                SimEventKind::Queued => {
                    job.posts += 1;
                    continue;
                }
                SimEventKind::Started => {
                    open.insert(e.prompt_id.clone(), e.at_ms);
                    continue;
                }
                SimEventKind::Done { success: true } => ExecEnd::Success,
                SimEventKind::Done { success: false } | SimEventKind::Failed => ExecEnd::Error,
                SimEventKind::Interrupted => ExecEnd::Interrupted,
            };
            if let Some(start_ms) = open.remove(&e.prompt_id) {
                job.executions.push(Execution {
                    process: *process,
                    start_ms,
                    end_ms: e.at_ms,
                    end,
                });
            }
        }
        for (id, start_ms) in open {
            let (end_ms, end) = match killed.get(process) {
                Some(&at) => (at, ExecEnd::Killed),
                None => (i64::MAX, ExecEnd::Open),
            };
            jobs.entry(id).or_default().executions.push(Execution {
                process: *process,
                start_ms,
                end_ms,
                end,
            });
        }
    }
    for j in jobs.values_mut() {
        j.executions.sort_by_key(|e| e.start_ms);
    }
    jobs
}

/// Why a job counts as run twice, if it does: it completed on more than one
/// backend run, or two of its executions were on GPUs at the same time.
pub fn run_twice(job: &JobOnBackends) -> Option<String> {
    let ok: Vec<&Execution> = job
        .executions
        .iter()
        .filter(|e| e.end == ExecEnd::Success)
        .collect();
    if ok.len() > 1 {
        let wh: Vec<String> = ok.iter().map(|e| proc_name(e.process)).collect();
        return Some(format!("completed {} times ({})", ok.len(), wh.join(", ")));
    }
    for (i, a) in job.executions.iter().enumerate() {
        for b in &job.executions[i + 1..] {
            if a.process != b.process && a.start_ms < b.end_ms && b.start_ms < a.end_ms {
                return Some(format!(
                    "ran on {} and {} at the same time",
                    proc_name(a.process),
                    proc_name(b.process)
                ));
            }
        }
    }
    None
}

pub fn proc_name((sim, inc): Process) -> String {
    format!("sim{}#{}", sim + 1, inc + 1)
}

/// A failure reason with its numbers (file names, counts, seconds) blanked,
/// so that the same cause groups together.
pub fn reason_kind(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut in_digits = false;
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out
}

/// Jain's fairness index of the shares `xs`: 1 when all are equal, 1/n when
/// one gets everything; `None` without shares or when all are zero.
pub fn jain(xs: &[f64]) -> Option<f64> {
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    (sq > 0.0).then(|| sum * sum / (xs.len() as f64 * sq))
}

/// A job as the fairness windows see it (times in ms).
#[derive(Debug, Clone)]
pub struct JobSpan {
    pub user: String,
    pub created_ms: i64,
    /// When it ended, if it did.
    pub ended_ms: Option<i64>,
    pub succeeded: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub start_ms: i64,
    /// Participants with a job waiting or running at some point of the window.
    pub active: usize,
    /// Of those, the ones with a job waiting or running all through the window.
    pub backlogged: usize,
    /// Jobs that succeeded within the window.
    pub done: usize,
    /// Jain's index of the completions of the active participants (it also
    /// reflects how much each one asked for).
    pub jain: Option<f64>,
    /// The same among the backlogged participants only (each could have taken
    /// a GPU at any moment: what they got is the scheduler's doing).
    pub jain_backlogged: Option<f64>,
}

/// From when to when a job waited or ran (ms).
type Span = (i64, i64);

/// Whether the union of `spans` covers `[start, end]`.
fn covers(spans: &mut [Span], start: i64, end: i64) -> bool {
    spans.sort();
    let mut reach = start;
    for &(a, b) in spans.iter() {
        if a > reach {
            break;
        }
        reach = reach.max(b);
        if reach >= end {
            return true;
        }
    }
    false
}

/// Jobs completed per participant per full window, among the participants who
/// wanted something in that window (an idle participant is not treated
/// unfairly), and among those who wanted something all through it.
pub fn fairness(jobs: &[JobSpan], from_ms: i64, to_ms: i64, window_ms: i64) -> Vec<Window> {
    let mut out = Vec::new();
    let mut start = from_ms;
    while window_ms > 0 && start + window_ms <= to_ms {
        let end = start + window_ms;
        // Per participant: jobs done in the window, and when they had work.
        let mut per: BTreeMap<&str, (f64, Vec<Span>)> = BTreeMap::new();
        let mut done = 0;
        for j in jobs {
            let active = j.created_ms < end && j.ended_ms.is_none_or(|e| e > start);
            if active {
                let (n, spans) = per.entry(j.user.as_str()).or_default();
                spans.push((j.created_ms, j.ended_ms.unwrap_or(i64::MAX)));
                if j.succeeded && j.ended_ms.is_some_and(|e| e > start && e <= end) {
                    *n += 1.0;
                    done += 1;
                }
            }
        }
        let xs: Vec<f64> = per.values().map(|(n, _)| *n).collect();
        let busy: Vec<f64> = per
            .values_mut()
            .filter_map(|(n, spans)| covers(spans, start, end).then_some(*n))
            .collect();
        out.push(Window {
            start_ms: start,
            active: xs.len(),
            backlogged: busy.len(),
            done,
            jain: jain(&xs),
            // One participant alone is trivially treated fairly.
            jain_backlogged: if busy.len() > 1 { jain(&busy) } else { None },
        });
        start = end;
    }
    out
}

/// The level and message of a `tracing` log line in its default format
/// (`TIME LEVEL [span{..}:] target: message key=value ...`), colours or not.
pub fn log_message(raw: &str) -> Option<(String, String)> {
    let line = strip_ansi(raw);
    let mut rest = line.trim_start();
    // The timestamp, then the level.
    rest = rest.split_once(char::is_whitespace)?.1.trim_start();
    let (level, after) = rest.split_once(char::is_whitespace)?;
    if !matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR") {
        return None;
    }
    // The target is the first token shaped like a Rust path followed by ':'.
    let is_target = |t: &str| {
        t.strip_suffix(':').is_some_and(|p| {
            !p.is_empty()
                && p.split("::").all(|seg| {
                    !seg.is_empty()
                        && seg
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
        })
    };
    let mut msg_start = None;
    let mut pos = 0;
    for tok in after.split(' ') {
        if is_target(tok) {
            msg_start = Some(pos + tok.len() + 1);
            break;
        }
        pos += tok.len() + 1;
    }
    let msg = after.get(msg_start?..)?.trim();
    // The message ends where the first `key=value` field starts.
    let mut end = msg.len();
    let bytes = msg.as_bytes();
    for (i, _) in msg.match_indices(' ') {
        let word: String = msg[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        if !word.is_empty() && bytes.get(i + 1 + word.len()) == Some(&b'=') {
            end = i;
            break;
        }
    }
    Some((level.to_string(), msg[..end].trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_coloured_simulator_log() {
        let log = "\u{1b}[2m2026-12-06T16:48:05.580231Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mcomfyume_sim::http\u{1b}[0m\u{1b}[2m:\u{1b}[0m prompt queued \u{1b}[3mprompt_id\u{1b}[0m\u{1b}[2m=\u{1b}[0m8bce44b1-2f90\n\
            2026-12-06T16:48:05.581524Z  INFO comfyume_sim::exec: job started prompt_id=8bce44b1-2f90\n\
            2026-12-06T16:48:05.589645Z  INFO comfyume_sim::exec: job done prompt_id=8bce44b1-2f90 status_str=\"success\" ms=8\n\
            2026-12-06T16:48:06.000Z  INFO comfyume_sim::exec: job done prompt_id=x status_str=\"error\" ms=8\n\
            2026-12-06T16:48:06.100Z  INFO comfyume_sim::exec: job interrupted prompt_id=y node=3\n\
            2026-12-06T16:48:06.200Z  INFO comfyume_sim::exec: job failed prompt_id=z node=3 message=boom\n\
            2026-12-06T16:48:06.596285Z  INFO comfyume_sim: shutting down\n\
            garbage line prompt_id=q job started\n";
        let ev = parse_sim_log(log);
        let kinds: Vec<SimEventKind> = ev.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                SimEventKind::Queued,
                SimEventKind::Started,
                SimEventKind::Done { success: true },
                SimEventKind::Done { success: false },
                SimEventKind::Interrupted,
                SimEventKind::Failed,
            ]
        );
        assert_eq!(ev[0].prompt_id, "8bce44b1-2f90");
        assert_eq!(ev[2].at_ms - ev[1].at_ms, 8);
    }

    #[test]
    fn utc_timestamps() {
        assert_eq!(parse_utc_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc_ms("1970-01-02T00:00:01.5Z"), Some(86_401_500));
        // `date -u -d 2026-12-06T16:48:05Z +%s` = 1796575685
        assert_eq!(
            parse_utc_ms("2026-12-06T16:48:05.581524Z"),
            Some(1_796_575_685_581)
        );
        assert_eq!(
            parse_utc_ms("2024-02-29T12:00:00Z"),
            Some(1_709_208_000_000)
        );
        for bad in ["", "2026-12-06 16:48:05Z", "2026-13-01T00:00:00Z", "x"] {
            assert_eq!(parse_utc_ms(bad), None, "{bad}");
        }
    }

    fn ev(at_ms: i64, id: &str, kind: SimEventKind) -> SimEvent {
        SimEvent {
            at_ms,
            prompt_id: id.into(),
            kind,
        }
    }

    use SimEventKind::*;

    #[test]
    fn a_retry_after_a_kill_is_not_a_second_run() {
        let a = vec![ev(0, "j", Queued), ev(10, "j", Started)];
        let b = vec![
            ev(200, "j", Queued),
            ev(210, "j", Started),
            ev(400, "j", Done { success: true }),
        ];
        let killed = HashMap::from([((0, 0), 100)]);
        let jobs = executions(&[((0, 0), a), ((1, 0), b)], &killed);
        let j = &jobs["j"];
        assert_eq!(j.posts, 2);
        assert_eq!(j.executions.len(), 2);
        assert_eq!(j.executions[0].end, ExecEnd::Killed);
        assert_eq!(j.executions[0].end_ms, 100);
        assert_eq!(run_twice(j), None);
    }

    #[test]
    fn two_completions_or_an_overlap_are_a_second_run() {
        let a = vec![
            ev(10, "j", Started),
            ev(50, "j", Done { success: true }),
            ev(60, "k", Started),
        ];
        let b = vec![
            ev(100, "j", Started),
            ev(150, "j", Done { success: true }),
            ev(70, "k", Started),
            ev(90, "k", Interrupted),
        ];
        let jobs = executions(&[((0, 0), a), ((1, 0), b)], &HashMap::new());
        assert!(run_twice(&jobs["j"]).unwrap().contains("completed 2 times"));
        // k still runs on sim1 (never ended there) while sim2 ran it too.
        assert_eq!(jobs["k"].executions[0].end, ExecEnd::Open);
        assert!(run_twice(&jobs["k"]).unwrap().contains("same time"));
        // One execution, stopped, then one elsewhere afterwards: fine.
        let c = vec![ev(0, "m", Started), ev(5, "m", Interrupted)];
        let d = vec![ev(6, "m", Started), ev(9, "m", Done { success: true })];
        let jobs = executions(&[((0, 0), c), ((0, 1), d)], &HashMap::new());
        assert_eq!(run_twice(&jobs["m"]), None);
    }

    #[test]
    fn reasons_group_without_their_numbers() {
        assert_eq!(
            reason_kind(
                "cannot save output flux2_00061_.png: No space left (os error 28). Gave up after 3 attempts."
            ),
            "cannot save output flux#_#_.png: No space left (os error #). Gave up after # attempts."
        );
        assert_eq!(reason_kind("plain"), "plain");
    }

    #[test]
    fn jain_index() {
        assert_eq!(jain(&[]), None);
        assert_eq!(jain(&[0.0, 0.0]), None);
        assert_eq!(jain(&[3.0, 3.0, 3.0]), Some(1.0));
        assert_eq!(jain(&[4.0, 0.0, 0.0, 0.0]), Some(0.25));
        let j = jain(&[1.0, 2.0]).unwrap();
        assert!((j - 0.9).abs() < 1e-9);
    }

    fn span(user: &str, created: i64, ended: Option<i64>, ok: bool) -> JobSpan {
        JobSpan {
            user: user.into(),
            created_ms: created,
            ended_ms: ended,
            succeeded: ok,
        }
    }

    #[test]
    fn fairness_counts_only_participants_who_wanted_something() {
        let jobs = vec![
            span("a", 0, Some(5), true),
            span("a", 6, Some(8), true),
            span("b", 1, Some(9), true),
            // c waits through the first window and gets nothing in it.
            span("c", 2, Some(15), true),
            // d only shows up in the second window.
            span("d", 12, Some(14), false),
        ];
        // The last, partial window (20-25) is left out.
        let w = fairness(&jobs, 0, 25, 10);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].active, w[0].done), (3, 3));
        // a: 2, b: 1, c: 0 -> 9 / (3 * 5)
        assert!((w[0].jain.unwrap() - 0.6).abs() < 1e-9);
        // All through 0-10: a (0-5, 6-8 leaves a gap) is not, c (2-15) neither
        // (it arrived at 2); nobody was.
        assert_eq!((w[0].backlogged, w[0].jain_backlogged), (0, None));
        assert_eq!((w[1].active, w[1].done), (2, 1));
        assert!((w[1].jain.unwrap() - 0.5).abs() < 1e-9);
        // A job still open counts as waiting, all through.
        let open = fairness(&[span("a", 0, None, false)], 0, 10, 10);
        assert_eq!(
            (open[0].active, open[0].backlogged, open[0].jain),
            (1, 1, None)
        );
        assert_eq!(open[0].jain_backlogged, None);
        // Two participants waiting all through, served 3 and 1.
        let busy = vec![
            span("p", -5, Some(3), true),
            span("p", 3, Some(6), true),
            span("p", 6, Some(9), true),
            span("p", 9, Some(30), false),
            span("q", -5, Some(8), true),
            span("q", 8, None, false),
        ];
        let w = fairness(&busy, 0, 10, 10);
        assert_eq!((w[0].backlogged, w[0].done), (2, 4));
        // 16 / (2 * 10)
        assert!((w[0].jain_backlogged.unwrap() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn messages_of_log_lines() {
        let l = "\u{1b}[2m2026-12-06T16:48:05.580231Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[1mcomfyui_job\u{1b}[0m\u{1b}[1m{\u{1b}[0mbackend=comfyui-1 job=abc\u{1b}[1m}\u{1b}[0m\u{1b}[2m:\u{1b}[0m \u{1b}[2mcomfyume_comfyui::run\u{1b}[0m\u{1b}[2m:\u{1b}[0m WebSocket dropped mid-job; reconnecting \u{1b}[3mjob\u{1b}[0m\u{1b}[2m=\u{1b}[0mabc";
        assert_eq!(
            log_message(l),
            Some((
                "WARN".into(),
                "WebSocket dropped mid-job; reconnecting".into()
            ))
        );
        let l = "2026-12-06T16:48:05Z ERROR comfyume_dispatch::dispatcher: could not record a job's outcome job_id=x error=database: locked";
        assert_eq!(
            log_message(l).unwrap().1,
            "could not record a job's outcome"
        );
        assert_eq!(log_message("listening on http://x"), None);
        assert_eq!(log_message(""), None);
    }
}
