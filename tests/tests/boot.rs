//! The foundation: the tiny guest boots on 1 and 4 vCPUs and every vCPU's
//! heartbeat, timer and workload counters advance; KVM's dirty log reports
//! every page the guest wrote.

use std::time::Duration;

use guest_images::abi::{self, phase, PAGE_SIZE};
use tests::require_kvm;
use vmm::machine::VcpuStatus;
use vmm::{Machine, MachineConfig, RunOptions, Workload};

fn boot(vcpus: u8, mem: u64, workload: &str) -> Machine {
    let config = MachineConfig {
        mem_bytes: mem,
        vcpus,
        guest: "workload".into(),
        workload: Workload::parse(workload).unwrap(),
    };
    Machine::boot(config, &RunOptions::default()).expect("boot")
}

fn wait_running(m: &Machine) -> Vec<VcpuStatus> {
    for _ in 0..1500 {
        let s = m.guest_status().unwrap();
        if s.iter().all(|c| c.phase == phase::RUNNING) {
            return s;
        }
        assert!(
            m.stop_reason().is_none(),
            "machine stopped: {:?}",
            m.stop_reason()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "guest never reached RUNNING: {:?}",
        m.guest_status().unwrap()
    );
}

fn boots_and_every_vcpu_advances(vcpus: u8) {
    if !require_kvm() {
        return;
    }
    let m = boot(vcpus, 256 << 20, "wset=32M,rate=2000,read=2000");
    let before = wait_running(&m);
    let hb_before: Vec<u64> = m
        .devices()
        .probe
        .heartbeats()
        .iter()
        .map(|h| h.count)
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    let after = m.guest_status().unwrap();
    let hb_after = m.devices().probe.heartbeats();
    for i in 0..usize::from(vcpus) {
        let (b, a) = (&before[i], &after[i]);
        assert!(
            hb_after[i].count > hb_before[i] + 100,
            "vCPU {i}: heartbeats did not advance"
        );
        assert_eq!(
            hb_after[i].discontinuities, 0,
            "vCPU {i}: heartbeat values skipped"
        );
        assert!(
            a.heartbeats > b.heartbeats,
            "vCPU {i}: guest heartbeat counter stuck"
        );
        assert!(
            a.ticks >= b.ticks + 20,
            "vCPU {i}: timer ticks {} -> {}",
            b.ticks,
            a.ticks
        );
        assert!(
            a.pages_written > b.pages_written,
            "vCPU {i}: no pages written"
        );
        assert!(a.pages_read > b.pages_read, "vCPU {i}: no pages read");
        assert!(a.fpu_checks > b.fpu_checks, "vCPU {i}: FPU not checked");
        assert_eq!(a.fpu_errors, 0, "vCPU {i}: FPU errors");
        assert_eq!(a.read_errors, 0, "vCPU {i}: read errors");
        assert!(a.slice_pages > 0, "vCPU {i}: owns no pages");
    }
    let total: u64 = after.iter().map(|c| c.slice_pages).sum();
    assert_eq!(total, 32 * 256, "slices must cover the working set");
    let v = m.request_verify(Duration::from_secs(30)).unwrap();
    assert!(v.ok && v.pages_ok == total, "{v:?}");
    m.pause();
    let scan = m.scan_working_set().unwrap();
    assert_eq!(
        (scan.good, scan.corrupt, scan.stale),
        (total, 0, 0),
        "{scan:?}"
    );
    m.shutdown();
}

#[test]
fn boots_on_one_vcpu() {
    boots_and_every_vcpu_advances(1);
}

#[test]
fn boots_on_four_vcpus() {
    boots_and_every_vcpu_advances(4);
}

/// Every working-set page whose generation changed during a window must be
/// in KVM's dirty log for that window. Pages outside the working set that
/// are also reported are explained: the generation table, the status page
/// (counters), the guest image (stacks, page tables whose accessed/dirty
/// bits the shadow MMU updates).
#[test]
fn dirty_log_reports_every_page_the_guest_wrote() {
    if !require_kvm() {
        return;
    }
    let wset_pages = 16 * 256;
    let vcpus = 2;
    let m = boot(vcpus, 128 << 20, "wset=16M,rate=20000,pattern=random");
    wait_running(&m);
    let ram = m.vm().ram();
    // (generation, mid-rewrite) of every working-set page. The guest clears
    // a page's magic while it rewrites it; a vCPU paused there leaves one
    // page whose new generation is already written and whose rewrite ends
    // (dirtying it) only after the resume.
    let generations = || -> Vec<(u64, bool)> {
        let mut buf = [0u8; 4096];
        (0..wset_pages)
            .map(|j| {
                let off = ram.ram_offset_of(abi::wset_page_gpa(j)).unwrap();
                ram.read_ram(off, &mut buf).unwrap();
                let magic = u64::from_le_bytes(buf[0..8].try_into().unwrap());
                let gen = u64::from_le_bytes(buf[16..24].try_into().unwrap());
                (gen, magic != abi::pattern::MAGIC)
            })
            .collect()
    };
    m.pause();
    m.vm().set_dirty_logging(true).unwrap();
    m.vm().take_dirty_bitmap().unwrap();
    let g0 = generations();
    m.resume();
    std::thread::sleep(Duration::from_millis(300));
    m.pause();
    let bits = m.vm().take_dirty_bitmap().unwrap();
    let g1 = generations();
    let torn: Vec<u64> = (0..wset_pages).filter(|&j| g0[j as usize].1).collect();
    assert!(
        torn.len() <= 2,
        "more pages mid-rewrite than vCPUs: {torn:?}"
    );
    let dirty = |gpa: u64| {
        let p = ram.ram_offset_of(gpa).unwrap() / PAGE_SIZE;
        bits[(p / 64) as usize] & (1 << (p % 64)) != 0
    };
    let mut written = 0;
    for j in 0..wset_pages {
        if g0[j as usize].0 != g1[j as usize].0 {
            written += 1;
            assert!(
                dirty(abi::wset_page_gpa(j)),
                "page {j} was written but is not in the dirty log"
            );
        }
    }
    assert!(
        written > 500,
        "the guest wrote only {written} pages in 300 ms"
    );
    // Every other dirty page must be one we can explain.
    let wset = abi::WSET_GPA..abi::wset_page_gpa(wset_pages);
    let gen_table = abi::GEN_TABLE_GPA..abi::GEN_TABLE_GPA + 4 * wset_pages;
    let image = abi::IMAGE_GPA..abi::GEN_TABLE_GPA;
    let status = abi::STATUS_GPA..abi::STATUS_GPA + PAGE_SIZE;
    let mut unexplained = Vec::new();
    for p in 0..ram.pages() {
        if bits[(p / 64) as usize] & (1 << (p % 64)) == 0 {
            continue;
        }
        let gpa = ram.gpa_of(p * PAGE_SIZE).unwrap();
        let j = (gpa - abi::WSET_GPA.min(gpa)) / PAGE_SIZE;
        let explained = (wset.contains(&gpa)
            && (g0[j as usize].0 != g1[j as usize].0 || torn.contains(&j)))
            || gen_table.contains(&gpa)
            || image.contains(&gpa)
            || status.contains(&gpa);
        if !explained {
            unexplained.push(gpa);
        }
    }
    assert!(
        unexplained.is_empty(),
        "unexplained dirty pages: {unexplained:x?}"
    );
    m.vm().set_dirty_logging(false).unwrap();
    m.shutdown();
}
