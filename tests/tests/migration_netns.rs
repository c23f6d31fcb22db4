//! Migration across two network stacks: the destination runs in its own
//! network namespace, joined to the host's by a veth pair whose host end is
//! shaped by a `tbf` qdisc (netem is not in this kernel). The test creates
//! and removes the namespace and the link.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{migrate, per_vcpu, require_kvm, scratch, secret_file, Receiver, VmmProcess};

/// A namespace with a veth link to the host; removed on drop.
struct TestNet {
    ns: String,
    host_if: String,
    /// Address of the namespace's end.
    peer_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl TestNet {
    fn create(rate: &str) -> Result<Self, String> {
        let id = std::process::id() % 10_000;
        let ns = format!("vmmtest{id}");
        let host_if = format!("vmh{id}");
        let ns_if = format!("vmn{id}");
        let subnet = 64 + (id % 128);
        let (host_ip, peer_ip) = (format!("10.231.{subnet}.1"), format!("10.231.{subnet}.2"));
        let net = Self {
            ns: ns.clone(),
            host_if: host_if.clone(),
            peer_ip: peer_ip.clone(),
        };
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", &ns, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let tc = Command::new("tc")
            .args([
                "qdisc", "add", "dev", &host_if, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms",
            ])
            .output()
            .map_err(|e| format!("tc: {e}"))?;
        if !tc.status.success() {
            return Err(format!("tc: {}", String::from_utf8_lossy(&tc.stderr)));
        }
        Ok(net)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

#[test]
fn migrate_across_network_namespaces_over_a_shaped_veth() {
    if !require_kvm() {
        return;
    }
    let net = match TestNet::create("400mbit") {
        Ok(n) => n,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot build the test network on CI: {e}"
            );
            eprintln!("skipping: cannot build the test network here: {e}");
            return;
        }
    };
    let dir = scratch("netns");
    let secret = secret_file(&dir, "secret", "a secret across namespaces");
    let src = VmmProcess::start(
        &dir.join("src.sock"),
        &[
            "--memory",
            "256M",
            "--workload",
            "wset=32M,rate=2000,fill=100",
        ],
    );
    src.wait_running(Duration::from_secs(60));
    let dst = Receiver::start(
        &dir,
        &format!("{}:7431", net.peer_ip),
        &secret,
        Some(&net.ns),
    );
    let (ok, report, err) = migrate(
        &dir.join("src.sock"),
        &dst.addr,
        &secret,
        &["--verify", "--compression", "none"],
    );
    assert!(
        ok,
        "migration across namespaces failed: {err}\n{}",
        dst.stderr_text()
    );
    assert_eq!(report["mismatched_pages"], json!(0), "{report}");
    assert_eq!(report["guest_verified"], json!(true), "{report}");
    // 400 Mbit/s is 50 MB/s: round 0 cannot have gone faster.
    let mbps = report["rounds"][0]["bandwidth_mb_s"].as_f64().unwrap();
    assert!(
        mbps < 52.0 && mbps > 10.0,
        "round 0 at {mbps} MB/s over a 50 MB/s link: {report}"
    );
    src.quit();
    dst.wait_socket(Duration::from_secs(10));
    let s0 = dst.call(json!({"cmd": "state"}));
    std::thread::sleep(Duration::from_millis(300));
    let s1 = dst.call(json!({"cmd": "state"}));
    assert!(
        per_vcpu(&s1, "ticks")[0] > per_vcpu(&s0, "ticks")[0],
        "guest stopped after arriving"
    );
    drop(dst);
    drop(net);
    let _ = std::fs::remove_dir_all(dir);
}
