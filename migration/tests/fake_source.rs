//! The source engine against a scripted destination, with no KVM: an
//! in-memory `SourceVm` and a peer on loopback TCP that answers out of
//! turn or aborts. Whatever the peer does, the source guest must end as it
//! began (running, never left paused).

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use migration::auth::{authenticate_as_destination, Secret};
use migration::protocol::{read_frame, write_frame, Abort, AbortCode, Kind, ProtocolError};
use migration::secure::Protection;
use migration::{BoxError, MigrationError, Options, SourceVm};

const SECRET: &[u8] = b"0123456789abcdef";
const RAM: u64 = 64 * 4096;

/// 64 pages of RAM; counts pauses and resumes.
#[derive(Default)]
struct FakeSource {
    pauses: AtomicU32,
    resumes: AtomicU32,
    dirty: Mutex<Vec<u64>>,
}

impl SourceVm for FakeSource {
    fn ram_size(&self) -> u64 {
        RAM
    }
    fn populated_ranges(&self) -> Result<Vec<(u64, u64)>, BoxError> {
        Ok(vec![(0, RAM)])
    }
    fn read_ram(&self, offset: u64, buf: &mut [u8]) -> Result<(), BoxError> {
        buf.fill((offset / 4096) as u8);
        Ok(())
    }
    fn start_dirty_log(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn stop_dirty_log(&self) -> Result<(), BoxError> {
        Ok(())
    }
    fn take_dirty_bitmap(&self) -> Result<Vec<u64>, BoxError> {
        Ok(std::mem::replace(&mut *self.dirty.lock().unwrap(), vec![0]))
    }
    fn pause(&self) {
        self.pauses.fetch_add(1, Ordering::SeqCst);
    }
    fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::SeqCst);
    }
    fn set_throttle(&self, _pct: u8) {}
    fn config_blob(&self) -> Result<Vec<u8>, BoxError> {
        Ok(b"{}".to_vec())
    }
    fn state_blob(&self) -> Result<Vec<u8>, BoxError> {
        Ok(b"state".to_vec())
    }
    fn ram_mappings(&self) -> Result<Vec<(u64, u64, u64)>, BoxError> {
        Ok(Vec::new())
    }
}

/// Migrates a fake source to a peer that runs `script` after the
/// handshake and `Config`.
fn migrate_to(
    script: impl FnOnce(&mut std::net::TcpStream) + Send + 'static,
) -> (Result<migration::Report, MigrationError>, FakeSource) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        authenticate_as_destination(&mut s, &Secret::from_bytes(SECRET)).unwrap();
        read_frame(&mut s).unwrap().expect(Kind::Config).unwrap();
        script(&mut s);
    });
    let vm = FakeSource {
        dirty: Mutex::new(vec![0]),
        ..Default::default()
    };
    // The fake destination speaks the protocol in the clear.
    let secret = Protection::InsecurePlaintext(Secret::from_bytes(SECRET));
    let r = migration::migrate(&vm, &addr, &secret, &Options::default(), Default::default());
    peer.join().unwrap();
    (r, vm)
}

/// Reads frames until a `RoundEnd`, and acknowledges it.
fn take_round(s: &mut std::net::TcpStream) {
    loop {
        let f = read_frame(s).unwrap();
        if f.kind == Kind::RoundEnd {
            write_frame(s, Kind::RoundAck, &f.payload).unwrap();
            return;
        }
    }
}

#[test]
fn a_destination_out_of_turn_fails_the_migration() {
    // `Resumed` where `Ready` belongs.
    let (r, vm) = migrate_to(|s| write_frame(s, Kind::Resumed, b"{}").unwrap());
    let err = r.unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::Protocol(ProtocolError::Unexpected { .. })
        ),
        "{err:?}"
    );
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 0, "never paused");
}

#[test]
fn a_destination_abort_reaches_the_source_as_its_code() {
    // Round 0 converges (nothing dirty), the source pauses and sends the
    // state; the destination then finds pages that differ.
    let (r, vm) = migrate_to(|s| {
        write_frame(s, Kind::Ready, &[]).unwrap();
        take_round(s);
        take_round(s); // the last round, paused
        read_frame(s).unwrap().expect(Kind::State).unwrap();
        read_frame(s).unwrap().expect(Kind::Complete).unwrap();
        let abort = Abort::new(AbortCode::PagesDiffer, 3, "");
        write_frame(s, Kind::Abort, &abort.encode()).unwrap();
    });
    assert!(matches!(r, Err(MigrationError::Mismatch(3))), "{r:?}");
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(
        vm.resumes.load(Ordering::SeqCst),
        1,
        "resumed after the abort"
    );
}

#[test]
fn a_destination_that_vanishes_after_the_state_leaves_the_source_running() {
    let (r, vm) = migrate_to(|s| {
        write_frame(s, Kind::Ready, &[]).unwrap();
        take_round(s);
        take_round(s);
        read_frame(s).unwrap().expect(Kind::State).unwrap();
    });
    assert!(r.is_err());
    assert_eq!(
        vm.pauses.load(Ordering::SeqCst),
        vm.resumes.load(Ordering::SeqCst)
    );
}

#[test]
fn a_cancel_in_a_round_tells_the_destination_and_leaves_the_source_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let control = std::sync::Arc::new(migration::Control::default());
    let steer = control.clone();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        authenticate_as_destination(&mut s, &Secret::from_bytes(SECRET)).unwrap();
        read_frame(&mut s).unwrap().expect(Kind::Config).unwrap();
        write_frame(&mut s, Kind::Ready, &[]).unwrap();
        // The cancel comes while round 0 is under way (its pages arrived,
        // the source waits for the round's ack).
        while read_frame(&mut s).unwrap().kind != Kind::Pages {}
        steer.cancel().unwrap();
        take_round(&mut s);
        match read_frame(&mut s) {
            Ok(f) if f.kind == Kind::Abort => Abort::decode(&f.payload).unwrap(),
            Ok(f) => panic!("{:?} after the cancel", f.kind),
            Err(ProtocolError::PeerAborted(a)) => a,
            Err(e) => panic!("no Abort before the connection closed: {e}"),
        }
    });
    let vm = FakeSource {
        dirty: Mutex::new(vec![u64::MAX]),
        ..Default::default()
    };
    let opts = Options::default();
    let r = migration::migrate_controlled(
        &vm,
        &addr,
        &Protection::InsecurePlaintext(Secret::from_bytes(SECRET)),
        &opts,
        &mut migration::policy::Builtin::new(&opts),
        Default::default(),
        control.clone(),
    );
    let abort = peer.join().unwrap();
    assert!(matches!(r, Err(MigrationError::Cancelled(_))), "{r:?}");
    assert_eq!(abort.code, AbortCode::Cancelled);
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 0, "never paused");
    // Too late to switch over now: the cancel won.
    assert!(control.commit_switch_over().is_err());
}
