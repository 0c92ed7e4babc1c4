//! Two nodes on this machine: an orchestrator and two `mixlm train` processes on
//! 127.0.0.1 train the tiny preset together and agree with one process of two peers;
//! a node killed mid-run makes the other stop with an error naming the timeout.
//! Every process is bounded in time and killed when the test ends.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits up to `limit` for the exit; (success, stderr).
    fn finish(mut self, limit: Duration) -> (bool, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                self.0
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status.success(), err);
            }
            assert!(
                start.elapsed() < limit,
                "a node did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn orchestrator() -> (Proc, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_mixlm"))
        .args(["orchestrator", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "no orchestrator");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc(child), port)
}

fn run_args(out: &Path, steps: u32) -> Vec<String> {
    [
        format!("run.out_dir=\"{}\"", out.display()),
        format!("run.steps={steps}"),
        "run.batch_size=2".into(),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=1".into(),
        "eval.sequences=4".into(),
        "eval.every=0".into(),
        "mixing.method=\"odm\"".into(),
        "distributed.timeout_s=5".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn node(out: &Path, steps: u32, orchestrator: u16, rank: usize) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_mixlm"))
        .args(["train", "--quiet", "--nodes", "2"])
        .args(["--node-rank", &rank.to_string()])
        .args(["--orchestrator", &format!("127.0.0.1:{orchestrator}")])
        .args(["--node-address", &format!("127.0.0.1:{}", free_port())])
        .args(run_args(out, steps))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc(child)
}

/// The training records of a finished run, without their wall-clock fields.
fn train_records(run_dir: &Path) -> Vec<Value> {
    common::metrics(run_dir)
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .collect()
}

#[test]
fn two_nodes_through_an_orchestrator_train_like_two_local_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (_orchestrator, port) = orchestrator();
    let nodes_out = dir.path().join("nodes");
    let n0 = node(&nodes_out, 4, port, 0);
    let n1 = node(&nodes_out, 4, port, 1);
    let (ok0, err0) = n0.finish(Duration::from_secs(120));
    let (ok1, err1) = n1.finish(Duration::from_secs(120));
    assert!(ok0, "node 0: {err0}");
    assert!(ok1, "node 1: {err1}");
    assert!(
        err0.contains("2 peers (2 nodes x 1 devices; this is node 0)"),
        "{err0}"
    );

    let local_out = dir.path().join("local");
    let mut args = vec!["train".to_string(), "--quiet".into(), "--devices".into()];
    args.push("2".into());
    args.extend(run_args(&local_out, 4));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = common::mixlm(&args);
    assert!(ok, "{err}");

    let (a, b) = (
        train_records(&nodes_out.join("demo")),
        train_records(&local_out.join("demo")),
    );
    assert_eq!(a.len(), 4);
    // The same sums of the same numbers: equal to the bit.
    assert_eq!(a, b, "two nodes vs two peers in one process");
}

#[test]
fn a_killed_node_makes_the_other_stop_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_orchestrator, port) = orchestrator();
    let out = dir.path().join("nodes");
    let n0 = node(&out, 100_000, port, 0);
    let mut n1 = node(&out, 100_000, port, 1);
    // Let them train a few steps together, then kill node 1 as a crash would.
    let start = Instant::now();
    while common::last_step(&out.join("demo")) < 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    n1.0.kill().unwrap();
    let killed = Instant::now();
    let (ok, err) = n0.finish(Duration::from_secs(60));
    assert!(!ok);
    // Node 0 learns of it from the dropped connection at once, or from the timeout.
    assert!(
        (err.contains("was cut off") || err.contains("stopped answering"))
            && err.contains("mixlm train --resume"),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: data-parallel training stopped")),
        "ends with an error, not a panic: {err}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(40),
        "stopped {:?} after the kill",
        killed.elapsed()
    );
}
