//! A policy in another process: `vmm migrate --policy exec:PROGRAM`.
//!
//! Why: whoever experiments with migration algorithms should not have to
//! fork and rebuild the engine to try an idea. [`ExecPolicy`] runs a
//! program (a Python script, say) and asks it the same questions the
//! engine asks any [`Policy`], as JSON lines on the program's stdin; the
//! program answers each with one JSON line on its stdout, in the serde
//! form of the decision types of [`crate::policy`]:
//!
//! ```text
//! engine → program   {"ask":"after_round","view":{"elapsed_ms":812.5,"rounds":[...],...}}
//! program → engine   {"continue":{"throttle":"unchanged"}}
//! ```
//!
//! | `ask`        | `view`           | answer                                              |
//! |--------------|------------------|-----------------------------------------------------|
//! | `setup`      | [`SetupView`]    | [`Setup`] `{"measure_rates":false,"may_postcopy":true}` |
//! | `plan`       | [`PlanView`]     | [`Plan`] `{"start":"pre_copy"}`                     |
//! | `round`      | [`History`]      | [`RoundPlan`] `{"skip":"nothing"}`                  |
//! | `after_round`| [`History`]      | [`AfterRound`] `{"stop_and_copy":{"rule":"downtime"}}` |
//! | `push_order` | [`History`]      | [`PushOrder`] `"follow_faults"`                     |
//!
//! # A policy that misbehaves
//!
//! The program is not trusted to behave. Every answer has a deadline
//! ([`DEFAULT_DEADLINE`] unless told otherwise); an answer line is at most
//! [`MAX_LINE`] bytes; an answer that is not the decision asked for is
//! refused. A program that crashes, hangs past the deadline or answers
//! nonsense makes the ask fail with an [`ExecError`] naming the problem,
//! so the migration fails cleanly and the source guest runs on. Reads
//! happen on helper threads that hand lines over a channel, so the engine
//! waits with a deadline and never blocks on the program; writes happen on
//! another, so a program that stops reading cannot block the engine either.
//!
//! Whatever the program prints on stderr is forwarded to the log (as
//! warnings, each line cut at [`MAX_LINE`]) and its last [`STDERR_TAIL`]
//! bytes go into the error message, so that a Python traceback reaches the
//! user who ran `vmm migrate`.
//!
//! The program runs in a process group of its own. When the policy is
//! dropped (the migration succeeded, failed, or panicked) its stdin is
//! closed, it gets [`GRACE`] to exit, then the whole group is killed and
//! the program reaped: nothing it started outlives the migration.
//!
//! # Where it runs, and who may name it
//!
//! The engine runs in the source VMM, behind its control socket, and asks
//! the policy synchronously between rounds; so the program runs there too,
//! as a child of the source VMM, with its user and rights (asking a client
//! across the socket would add a round trip per decision and tie the
//! migration to the client's life). The program's path therefore travels
//! in the `migrate` request: whoever can write to the control socket can
//! have the VMM run any program. That is why the socket is created with
//! mode 0600 — only its owner, who could run that program anyway, can
//! name one.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    AfterRound, History, Plan, PlanView, Policy, PolicyError, PushOrder, RoundPlan, Setup,
    SetupView,
};

/// How long the program may take to answer one question, by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// The longest answer line accepted, in bytes (without its newline).
pub const MAX_LINE: usize = 64 * 1024;
/// How much of the program's stderr the error message quotes, in bytes.
pub const STDERR_TAIL: usize = 4096;
/// How long a program whose stdin was closed may take to exit by itself.
pub const GRACE: Duration = Duration::from_millis(100);
/// How much of a nonsense answer the error message quotes, in bytes.
const QUOTE: usize = 200;

/// An external policy's failure.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("Cannot start the policy program {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The policy program {program} failed when asked '{ask}'")]
    Answer {
        program: PathBuf,
        ask: &'static str,
        #[source]
        problem: Problem,
    },
}

/// What was wrong with the program's answer.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("it did not answer within {deadline:?}{stderr}")]
    Timeout { deadline: Duration, stderr: String },
    #[error("it closed its stdout without answering ({status}){stderr}")]
    Exited { status: String, stderr: String },
    #[error("its answer is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("its answer is not a valid '{ask}' decision: {quoted}")]
    Nonsense {
        ask: &'static str,
        quoted: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read its answer")]
    Read(#[source] io::Error),
    #[error("cannot encode the question")]
    Encode(#[source] serde_json::Error),
}

/// One line read from the program's stdout, as the reader thread saw it.
#[derive(Debug)]
enum Line {
    Text(String),
    TooLong,
    Eof,
    Failed(io::Error),
}

/// One question, as written to the program.
#[derive(Serialize)]
struct Question<'v, V: Serialize> {
    ask: &'static str,
    view: &'v V,
}

/// A [`Policy`] answered by an external program (see the module
/// documentation for the protocol and for what happens when it misbehaves).
#[derive(Debug)]
pub struct ExecPolicy {
    program: PathBuf,
    deadline: Duration,
    child: Child,
    /// Lines for the writer thread; `None` once stdin is to be closed.
    questions: Option<Sender<String>>,
    answers: Receiver<Line>,
    stderr_tail: Arc<Mutex<String>>,
    stderr_thread: JoinHandle<()>,
}

impl ExecPolicy {
    /// Starts `program` (no arguments), in a process group of its own,
    /// with `deadline` for each answer.
    pub fn spawn(program: &Path, deadline: Duration) -> Result<Self, ExecError> {
        let spawn_err = |source| ExecError::Spawn {
            program: program.to_path_buf(),
            source,
        };
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(program)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .map_err(spawn_err)?
        };
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            unreachable!("all three pipes were asked for");
        };
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        let threads = spawn_helpers(program, stdin, stdout, stderr, &stderr_tail);
        let (questions, answers, stderr_thread) = match threads {
            Ok(t) => t,
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(spawn_err(e));
            }
        };
        Ok(Self {
            program: program.to_path_buf(),
            deadline,
            child,
            questions: Some(questions),
            answers,
            stderr_tail,
            stderr_thread,
        })
    }

    /// Asks one question and reads the decision.
    fn ask<V: Serialize, A: DeserializeOwned>(
        &mut self,
        ask: &'static str,
        view: &V,
    ) -> Result<A, PolicyError> {
        self.exchange(ask, view).map_err(|problem| {
            ExecError::Answer {
                program: self.program.clone(),
                ask,
                problem,
            }
            .into()
        })
    }

    fn exchange<V: Serialize, A: DeserializeOwned>(
        &mut self,
        ask: &'static str,
        view: &V,
    ) -> Result<A, Problem> {
        let line = serde_json::to_string(&Question { ask, view }).map_err(Problem::Encode)?;
        let sent = self.questions.as_ref().map(|q| q.send(line));
        if !matches!(sent, Some(Ok(()))) {
            // The writer thread ended: the program closed its stdin.
            return Err(self.exited());
        }
        let answer = self.answer()?;
        serde_json::from_str(answer.trim()).map_err(|source| Problem::Nonsense {
            ask,
            quoted: quote(&answer),
            source,
        })
    }

    /// The next answer line, within the deadline.
    fn answer(&mut self) -> Result<String, Problem> {
        match self.answers.recv_timeout(self.deadline) {
            Ok(Line::Text(t)) => Ok(t),
            Ok(Line::TooLong) => Err(Problem::TooLong),
            Ok(Line::Failed(e)) => Err(Problem::Read(e)),
            Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => Err(self.exited()),
            Err(RecvTimeoutError::Timeout) => Err(Problem::Timeout {
                deadline: self.deadline,
                stderr: self.stderr_tail(),
            }),
        }
    }

    /// The problem of a program that stopped talking: how it ended (if it
    /// did within the deadline) and what it said on stderr.
    fn exited(&mut self) -> Problem {
        let status = match peek_exit(&self.child, self.deadline) {
            Some(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
            Some(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
            _ => "still running".to_string(),
        };
        // Let the stderr thread catch up with the program's last words.
        let t = Instant::now();
        while !self.stderr_thread.is_finished() && t.elapsed() < GRACE {
            std::thread::sleep(Duration::from_millis(2));
        }
        Problem::Exited {
            status,
            stderr: self.stderr_tail(),
        }
    }

    /// `"; stderr: ..."` with the end of the program's stderr, if any.
    fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.trim().is_empty() {
            String::new()
        } else {
            format!("; its stderr ends with: {}", tail.trim_end())
        }
    }
}

impl Policy for ExecPolicy {
    fn setup(&mut self, view: &SetupView) -> Result<Setup, PolicyError> {
        self.ask("setup", view)
    }

    fn plan(&mut self, view: &PlanView) -> Result<Plan, PolicyError> {
        self.ask("plan", view)
    }

    fn round(&mut self, history: &History) -> Result<RoundPlan, PolicyError> {
        self.ask("round", history)
    }

    fn after_round(&mut self, history: &History) -> Result<AfterRound, PolicyError> {
        self.ask("after_round", history)
    }

    fn push_order(&mut self, history: &History) -> Result<PushOrder, PolicyError> {
        self.ask("push_order", history)
    }
}

impl Drop for ExecPolicy {
    fn drop(&mut self) {
        // End of input: a well-behaved program exits by itself.
        self.questions = None;
        let _ = peek_exit(&self.child, GRACE);
        kill_and_reap(&mut self.child);
    }
}

/// The writer, the stdout reader and the stderr forwarder threads.
type Helpers = (Sender<String>, Receiver<Line>, JoinHandle<()>);

fn spawn_helpers(
    program: &Path,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: ChildStderr,
    tail: &Arc<Mutex<String>>,
) -> io::Result<Helpers> {
    let (q_tx, q_rx) = mpsc::channel();
    let (a_tx, a_rx) = mpsc::channel();
    let named = |what: &str| std::thread::Builder::new().name(format!("policy-{what}"));
    named("in").spawn(move || write_questions(stdin, q_rx))?;
    named("out").spawn(move || read_answers(stdout, a_tx))?;
    let (tail, program) = (tail.clone(), program.display().to_string());
    let err = named("err").spawn(move || forward_stderr(stderr, &tail, &program))?;
    Ok((q_tx, a_rx, err))
}

/// Writes each question as a line until the channel or the pipe closes.
fn write_questions(mut stdin: ChildStdin, questions: Receiver<String>) {
    for q in questions {
        let wrote = stdin
            .write_all(q.as_bytes())
            .and_then(|()| stdin.write_all(b"\n"))
            .and_then(|()| stdin.flush());
        if wrote.is_err() {
            return;
        }
    }
}

/// Hands each stdout line over, until the end, an error or a line too long.
fn read_answers(stdout: ChildStdout, answers: Sender<Line>) {
    let mut r = BufReader::new(stdout);
    loop {
        let line = read_line(&mut r);
        let last = !matches!(line, Line::Text(_));
        if answers.send(line).is_err() || last {
            return;
        }
    }
}

/// One line of at most [`MAX_LINE`] bytes (a last line may lack its newline).
fn read_line(r: &mut impl BufRead) -> Line {
    let mut buf = Vec::new();
    match r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf) {
        Ok(0) => Line::Eof,
        Ok(_) if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE => Line::TooLong,
        Ok(_) => Line::Text(String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => Line::Failed(e),
    }
}

/// Logs each stderr line (cut at [`MAX_LINE`]) and keeps the last
/// [`STDERR_TAIL`] bytes in `tail`.
fn forward_stderr(stderr: ChildStderr, tail: &Mutex<String>, program: &str) {
    let mut r = BufReader::new(stderr);
    loop {
        let text = match read_line(&mut r) {
            Line::Text(t) => t,
            Line::TooLong => {
                // Skip the rest of an endless line: its start was logged.
                let mut rest = Vec::new();
                let _ = r.read_until(b'\n', &mut rest);
                continue;
            }
            Line::Eof | Line::Failed(_) => return,
        };
        tracing::warn!("policy {program}: {}", text.trim_end());
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        t.push_str(&text);
        keep_tail(&mut t, STDERR_TAIL);
    }
}

/// Cuts the front of `s` so that at most `max` bytes remain (on a char
/// boundary).
fn keep_tail(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = s.len() - max;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s.drain(..cut);
    }
}

/// At most [`QUOTE`] bytes of `s`, for a message.
fn quote(s: &str) -> String {
    let s = s.trim_end();
    let mut end = s.len().min(QUOTE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < s.len() { "..." } else { "" };
    format!("{:?}{more}", &s[..end])
}

/// How the program ended, if it does within `within`; the program stays
/// unreaped (`WNOWAIT`), so its pid — its process group's id — cannot be
/// reused before [`kill_and_reap`].
fn peek_exit(child: &Child, within: Duration) -> Option<WaitStatus> {
    let pid = Pid::from_raw(child.id() as i32);
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let t = Instant::now();
    loop {
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) if t.elapsed() < within => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(status) => return Some(status),
        }
    }
}

/// Kills the program's process group (anything it started too) and reaps
/// the program.
fn kill_and_reap(child: &mut Child) {
    let pgid = Pid::from_raw(child.id() as i32);
    // ESRCH (the group is gone already) is fine.
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Skip, Start, StopRule, Throttle};
    use crate::report::{Limits, Round};

    /// Writes `body` as an executable script named `name`.
    fn script(name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("exec-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Spawns `path`, retrying while another test thread's fork still holds
    /// the freshly written file open (ETXTBSY).
    fn spawn(path: &Path, deadline: Duration) -> ExecPolicy {
        for _ in 0..50 {
            match ExecPolicy::spawn(path, deadline) {
                Err(ExecError::Spawn { source, .. })
                    if source.kind() == io::ErrorKind::ExecutableFileBusy =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r.unwrap(),
            }
        }
        panic!("{} stayed busy", path.display());
    }

    fn history(rounds: u32) -> History {
        History {
            elapsed_ms: 1.0,
            limits: Limits::default(),
            measured: None,
            start: Start::PreCopy,
            rounds: (0..rounds)
                .map(|round| Round {
                    round,
                    pages: 1000,
                    dirtied_pages: 100,
                    dirty_rate_pages_s: 1e4,
                    ..Default::default()
                })
                .collect(),
            pending_pages: 100,
            bytes_sent: 1 << 20,
        }
    }

    fn setup_view() -> SetupView {
        SetupView {
            ram_bytes: 1 << 30,
            populated_bytes: 1 << 20,
            limits: Limits::default(),
        }
    }

    /// The problem behind a failed ask.
    fn problem(e: PolicyError) -> Problem {
        match e {
            PolicyError::External(ExecError::Answer { problem, .. }) => problem,
            e => panic!("not an external policy's answer: {e:?}"),
        }
    }

    /// Waits until no process `pid` is left (killed and reaped).
    fn assert_gone(pid: &str) {
        let proc = PathBuf::from(format!("/proc/{}", pid.trim()));
        let t = Instant::now();
        while proc.exists() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!proc.exists(), "process {pid} outlived its policy");
    }

    const ANSWERS: &str = r#"#!/bin/sh
while read -r line; do
  case "$line" in
    *'"ask":"setup"'*) echo '{"measure_rates":false,"may_postcopy":true}' ;;
    *'"ask":"plan"'*) echo '{"start":{"hybrid":{"precopy_bytes":4096}}}' ;;
    *'"ask":"round"'*) echo '{"skip":"redirtied"}' ;;
    *'"ask":"after_round"'*) echo '{"post_copy":{"rule":"threshold"}}' ;;
    *'"ask":"push_order"'*) echo '"ascending"' ;;
  esac
done
"#;

    #[test]
    fn every_question_gets_its_decision() {
        let mut p = spawn(&script("answers.sh", ANSWERS), DEFAULT_DEADLINE);
        let setup = p.setup(&setup_view()).unwrap();
        assert!(setup.may_postcopy && !setup.measure_rates);
        let plan = p
            .plan(&PlanView {
                ram_bytes: 1 << 30,
                populated_bytes: 1 << 20,
                limits: Limits::default(),
                measured: None,
            })
            .unwrap();
        assert_eq!(
            plan.start,
            Start::Hybrid {
                precopy_bytes: 4096
            }
        );
        assert_eq!(p.round(&history(1)).unwrap().skip, Skip::Redirtied);
        assert_eq!(
            p.after_round(&history(2)).unwrap(),
            AfterRound::PostCopy {
                rule: StopRule::Threshold
            }
        );
        assert_eq!(p.push_order(&history(2)).unwrap(), PushOrder::Ascending);
        let pid = p.child.id().to_string();
        drop(p);
        assert_gone(&pid);
    }

    #[test]
    fn a_crash_is_reported_with_its_status_and_stderr() {
        let body = "#!/bin/sh\nread -r line\necho 'Traceback: boom' >&2\nexit 3\n";
        let mut p = spawn(&script("crash.sh", body), DEFAULT_DEADLINE);
        let e = problem(p.after_round(&history(1)).unwrap_err());
        let text = e.to_string();
        assert!(matches!(e, Problem::Exited { .. }), "{e:?}");
        assert!(
            text.contains("exit status 3") && text.contains("boom"),
            "{text}"
        );
    }

    #[test]
    fn a_hang_ends_at_the_deadline_and_the_group_is_killed() {
        let dir = script("x", "").parent().unwrap().to_path_buf();
        let pids = dir.join("hang.pid");
        let body = format!(
            "#!/bin/sh\nsleep 30 &\necho $! > {}\nread -r line\nwait\n",
            pids.display()
        );
        let mut p = spawn(&script("hang.sh", &body), Duration::from_millis(300));
        let t = Instant::now();
        let e = problem(p.after_round(&history(1)).unwrap_err());
        assert!(matches!(e, Problem::Timeout { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let (shell, sleep) = (
            p.child.id().to_string(),
            std::fs::read_to_string(&pids).unwrap(),
        );
        drop(p);
        assert_gone(&shell);
        assert_gone(&sleep);
    }

    #[test]
    fn nonsense_is_refused() {
        let cases = [
            ("bad-json.sh", "echo 'continue please'", "expected"),
            (
                "unknown.sh",
                "echo '{\"jump\":{}}'",
                "unknown variant `jump`",
            ),
            (
                "too-long.sh",
                "head -c 70000 /dev/zero | tr '\\0' a; echo",
                "longer than",
            ),
        ];
        for (name, answer, expect) in cases {
            let path = script(
                name,
                &format!("#!/bin/sh\nread -r line\n{answer}\nsleep 5\n"),
            );
            let mut p = spawn(&path, DEFAULT_DEADLINE);
            let e = p.after_round(&history(1)).unwrap_err();
            let chain = chain(&e);
            assert!(chain.contains(&path.display().to_string()), "{chain}");
            assert!(chain.contains("'after_round'"), "{chain}");
            assert!(chain.contains(expect), "{name}: {chain}");
        }
    }

    /// `e` and its sources, as the user reads them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(c) = next {
            s = format!("{s}: {c}");
            next = c.source();
        }
        s
    }

    /// The cost of one ask, measured against a Python policy that answers
    /// `after_round` over a 10-round history (`--nocapture` shows it).
    #[test]
    fn cost_of_one_ask() {
        let body = "#!/usr/bin/env python3\nimport sys, json\nfor line in sys.stdin:\n    \
                    json.loads(line)\n    \
                    print('{\"continue\":{\"throttle\":\"unchanged\"}}', flush=True)\n";
        let mut p = spawn(&script("cost.py", body), Duration::from_secs(10));
        let h = history(10);
        p.after_round(&h).unwrap(); // Python's start-up is not the cost of an ask.
        let n = 500;
        let t = Instant::now();
        for _ in 0..n {
            let d = p.after_round(&h).unwrap();
            assert_eq!(
                d,
                AfterRound::Continue {
                    throttle: Throttle::Unchanged
                }
            );
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("external policy: {us:.0} µs per after_round ask (10-round history)");
        assert!(us < 100_000.0, "{us} µs per ask");
    }
}
