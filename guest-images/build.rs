//! Builds the tiny test guests from `guest/` with the system C toolchain:
//! every `guest/*.S` and `guest/*.c` is compiled by `gcc` and linked by `ld`
//! with `guest/link.ld` into `$OUT_DIR/workload.elf` (a static ELF64 loaded
//! at `ABI_IMAGE_GPA`), which `src/lib.rs` embeds.
//!
//! After linking, the ring-0 section is disassembled with `objdump` and the
//! build fails if it holds an instruction the target host's CPL-0 emulator
//! refuses (see `guest/README.md`).
//!
//! `GUEST_CC`, `GUEST_LD` and `GUEST_OBJDUMP` override the tool names
//! (default `gcc`, `ld`, `objdump`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags for every guest object. `-mgeneral-regs-only` is essential: the
/// guest keeps invariants in xmm8..15 and the x87 stack, so compiled code
/// must never touch vector or x87 registers.
const CFLAGS: &[&str] = &[
    "-O2",
    "-g0",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mcmodel=small",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",
    "-nostdlib",
    "-nostdinc",
    "-Wall",
    "-Wextra",
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("guest");
    let cc = env::var("GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("GUEST_LD").unwrap_or_else(|_| "ld".into());
    println!("cargo:rerun-if-env-changed=GUEST_CC");
    println!("cargo:rerun-if-env-changed=GUEST_LD");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", guest.display());

    let mut files: Vec<PathBuf> = std::fs::read_dir(&guest)
        .unwrap_or_else(|e| panic!("guest-images: cannot read {}: {e}", guest.display()))
        .map(|e| e.expect("guest-images: reading guest/").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    check_tool(&cc, "gcc");
    check_tool(&ld, "binutils");

    // gcc's own freestanding headers (stdarg.h) without the libc ones.
    let gcc_include = capture(Command::new(&cc).arg("-print-file-name=include"));
    let gcc_include = gcc_include.trim();

    let mut objects = Vec::new();
    for src in &files {
        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "c" && ext != "S" {
            continue;
        }
        let stem = src.file_stem().unwrap().to_string_lossy();
        let obj = out.join(format!("{stem}.{ext}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-isystem")
            .arg(gcc_include)
            .arg("-I")
            .arg(&guest)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, &format!("compiling {}", src.display()));
        objects.push(obj);
    }

    let elf = out.join("workload.elf");
    let mut cmd = Command::new(&ld);
    cmd.args([
        "-m",
        "elf_x86_64",
        "-static",
        "-nostdlib",
        "--build-id=none",
    ])
    .args(["-z", "max-page-size=4096", "-z", "noexecstack"])
    .arg("-T")
    .arg(guest.join("link.ld"))
    .arg("-o")
    .arg(&elf)
    .args(&objects);
    run(&mut cmd, "linking workload.elf");

    let objdump = env::var("GUEST_OBJDUMP").unwrap_or_else(|_| "objdump".into());
    println!("cargo:rerun-if-env-changed=GUEST_OBJDUMP");
    check_ring0(&objdump, &elf);
}

fn check_tool(tool: &str, package: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "guest-images: `{tool} --version` failed ({}): the guests need a working `{tool}` \
             (Debian/Ubuntu: apt-get install {package})",
            o.status
        ),
        Err(e) => panic!(
            "guest-images: cannot run `{tool}` ({e}): building the test guests needs the system \
             C toolchain, gcc and GNU ld for x86-64 (Debian/Ubuntu: apt-get install gcc binutils); \
             set GUEST_CC / GUEST_LD to use other names"
        ),
    }
}

fn capture(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("guest-images: running {cmd:?}: {e}"));
    if !o.status.success() {
        panic!(
            "guest-images: {cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn run(cmd: &mut Command, what: &str) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("guest-images: {what}: cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        panic!(
            "guest-images: {what} failed ({}):\n{cmd:?}\n{stderr}",
            o.status
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={what}: {line}");
    }
}

/// Mnemonics (as objdump prints them, any operand-size suffix stripped) that
/// the target host's CPL-0 emulator refuses. `xsave*`/`xrstor*` are matched
/// by prefix.
const RING0_FORBIDDEN: &[&str] = &["cmpxchg16b", "int3", "clac", "popcnt", "fwait", "ldmxcsr"];
const RING0_FORBIDDEN_PREFIXES: &[&str] = &["xsave", "xrstor"];

/// Disassembles the ring-0 code and fails on an instruction the target
/// host's CPL-0 emulator refuses. Skipped with a warning without objdump.
fn check_ring0(objdump: &str, elf: &Path) {
    let n32 = check_section(objdump, elf, ".ring0.32", Some("i386"));
    let n64 = check_section(objdump, elf, ".ring0", None);
    if let (Some(n32), Some(n64)) = (n32, n64) {
        assert!(
            n32 > 20 && n64 > 50,
            "guest-images: ring-0 disassembly looks wrong ({n32} + {n64} instructions)"
        );
    }
}

/// Checks one section; returns how many instructions it saw.
fn check_section(objdump: &str, elf: &Path, section: &str, machine: Option<&str>) -> Option<usize> {
    let mut cmd = Command::new(objdump);
    cmd.args(["-d", "--no-show-raw-insn", "-j", section]);
    if let Some(m) = machine {
        cmd.args(["-M", m]);
    }
    let out = cmd.arg(elf).output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        _ => {
            println!("cargo:warning=guest-images: `{objdump}` unavailable: ring-0 instruction check skipped");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut count = 0;
    for line in text.lines() {
        // "  100000:\tmov    $0x1,%eax"
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if addr.trim().is_empty() || !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        count += 1;
        for word in insn.split_whitespace().take(2) {
            // the first word may be a prefix (lock, rep, data16, rex.W ...)
            let w = word.to_ascii_lowercase();
            let bad = RING0_FORBIDDEN
                .iter()
                .any(|f| w == *f || w.strip_suffix(['b', 'w', 'l', 'q']) == Some(*f))
                || RING0_FORBIDDEN_PREFIXES.iter().any(|p| w.starts_with(p))
                || w == "wait";
            if bad || w == "(bad)" {
                panic!(
                    "guest-images: ring-0 code ({section}) contains `{w}`, which the target \
                     host's CPL-0 emulator refuses (or objdump cannot decode):\n{line}"
                );
            }
        }
    }
    Some(count)
}
