//! The protected stream under attack: a relay between the two ends
//! rewrites, drops, reorders and replays records; each must fail with a
//! typed error naming the record.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::thread;

use super::*;

const SECRET: &[u8] = b"correct horse battery staple";

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    (l, addr)
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let (l, _) = listener();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// One length-prefixed Noise message from `r`.
fn message(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).ok()?;
    let mut m = len.to_vec();
    m.resize(2 + u16::from_be_bytes(len) as usize, 0);
    r.read_exact(&mut m[2..]).ok()?;
    Some(m)
}

/// What the relay does after the edited records.
enum Flow {
    Continue,
    Cut,
}

/// A Noise pair through a relay that hands the first `records` transport
/// records from the source to `edit` before passing them on.
fn noise_via(
    records: usize,
    edit: impl FnOnce(&mut Vec<Vec<u8>>) -> Flow + Send + 'static,
) -> (
    SecureStream,
    thread::JoinHandle<Result<SecureStream, SecureError>>,
) {
    let (src_side, mut relay_a) = tcp_pair();
    let (mut relay_b, dst_side) = tcp_pair();
    let (mut back_b, mut back_a) = (relay_b.try_clone().unwrap(), relay_a.try_clone().unwrap());
    thread::spawn(move || std::io::copy(&mut back_b, &mut back_a));
    thread::spawn(move || {
        let hello = message(&mut relay_a).unwrap();
        relay_b.write_all(&hello).unwrap();
        let mut recs: Vec<Vec<u8>> = (0..records).map_while(|_| message(&mut relay_a)).collect();
        let flow = edit(&mut recs);
        for r in recs {
            relay_b.write_all(&r).unwrap();
        }
        match flow {
            Flow::Continue => drop(std::io::copy(&mut relay_a, &mut relay_b)),
            Flow::Cut => drop(relay_b.shutdown(std::net::Shutdown::Write)),
        }
    });
    let dst = thread::spawn(move || noise::respond(dst_side, &Secret::from_bytes(SECRET)));
    let src = noise::initiate(src_side, &Secret::from_bytes(SECRET)).unwrap();
    (src, dst)
}

/// Sends four one-record messages through `edit`; returns what the
/// destination read before its first error, and that error.
fn four_records(
    edit: impl FnOnce(&mut Vec<Vec<u8>>) -> Flow + Send + 'static,
) -> (Vec<u8>, SecureError) {
    let (mut src, dst) = noise_via(4, edit);
    for i in 0..4u8 {
        src.write_all(&[i; 100]).unwrap();
    }
    let mut dst = dst.join().unwrap().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 100];
    loop {
        match dst.read_exact(&mut buf) {
            Ok(()) => got.push(buf[0]),
            Err(e) => {
                let inner = e.into_inner().expect("a typed error");
                return (
                    got,
                    *inner.downcast::<SecureError>().expect("a SecureError"),
                );
            }
        }
    }
}

#[test]
fn untouched_records_pass() {
    let (mut src, dst) = noise_via(4, |_| Flow::Continue);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 9) as u8).collect();
    let sent = data.clone();
    let writer = thread::spawn(move || src.write_all(&sent));
    let mut dst = dst.join().unwrap().unwrap();
    let mut got = vec![0u8; data.len()];
    dst.read_exact(&mut got).unwrap();
    writer.join().unwrap().unwrap();
    assert!(got == data);
}

#[test]
fn a_flipped_byte_fails_its_record() {
    let (got, e) = four_records(|r| {
        r[1][10] ^= 1;
        Flow::Continue
    });
    assert_eq!(got, [0]);
    assert!(matches!(e, SecureError::Integrity { record: 1 }), "{e}");
}

#[test]
fn a_dropped_record_fails_the_next() {
    let (got, e) = four_records(|r| {
        r.remove(1);
        Flow::Continue
    });
    assert_eq!(got, [0]);
    assert!(matches!(e, SecureError::Integrity { record: 1 }), "{e}");
}

#[test]
fn reordered_records_fail() {
    let (got, e) = four_records(|r| {
        r.swap(1, 2);
        Flow::Continue
    });
    assert_eq!(got, [0]);
    assert!(matches!(e, SecureError::Integrity { record: 1 }), "{e}");
}

#[test]
fn a_replayed_record_fails() {
    let (got, e) = four_records(|r| {
        let first = r[0].clone();
        r.insert(1, first);
        Flow::Continue
    });
    assert_eq!(got, [0]);
    assert!(matches!(e, SecureError::Integrity { record: 1 }), "{e}");
}

#[test]
fn a_stream_cut_inside_a_record_is_truncated_not_short() {
    let (got, e) = four_records(|r| {
        r.truncate(2);
        r[1].truncate(40);
        Flow::Cut
    });
    assert_eq!(got, [0]);
    assert!(matches!(e, SecureError::Truncated { record: 1 }), "{e}");
}

#[test]
fn a_wrong_psk_fails_the_handshake() {
    let (a, b) = tcp_pair();
    let dst =
        thread::spawn(move || noise::respond(b, &Secret::from_bytes(b"another secret of 16+")));
    let src = noise::initiate(a, &Secret::from_bytes(SECRET));
    assert!(matches!(dst.join().unwrap(), Err(SecureError::WrongPsk)));
    assert!(src.is_err());
}

#[test]
fn the_psk_is_derived_not_the_secret_itself() {
    let a = noise::derive_psk(&Secret::from_bytes(SECRET));
    assert_eq!(a, noise::derive_psk(&Secret::from_bytes(SECRET)));
    assert_ne!(
        a,
        noise::derive_psk(&Secret::from_bytes(b"correct horse battery stapler"))
    );
    assert_ne!(&a[..SECRET.len()], SECRET);
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("secure-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn files(dir: &std::path::Path, end: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{end}.pem")),
        key: dir.join(format!("{end}.key")),
        ca: dir.join("ca.pem"),
    }
}

fn tls(f: TlsFiles) -> Protection {
    Protection::Tls(Arc::new(tls::TlsConfig::load(&f).unwrap()))
}

/// Runs `connect`/`accept` with the two protections; the source sends
/// 2 MiB that the destination reads back.
fn exchange(
    src: Protection,
    dst: Protection,
) -> (Result<(), SecureError>, Result<(), SecureError>) {
    let (l, addr) = listener();
    let d = thread::spawn(move || -> Result<(), SecureError> {
        let (mut s, _) = accept(&l, &dst)?;
        let mut buf = vec![0u8; 2 << 20];
        s.read_exact(&mut buf).map_err(SecureError::Io)?;
        assert!(buf.iter().enumerate().all(|(i, b)| *b == i as u8));
        s.write_all(b"ok").map_err(SecureError::Io)?;
        Ok(())
    });
    let s = (|| {
        let mut s = connect(&addr, &src)?;
        let data: Vec<u8> = (0..2u32 << 20).map(|i| i as u8).collect();
        s.write_all(&data).map_err(SecureError::Io)?;
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).map_err(SecureError::Io)?;
        Ok(())
    })();
    (s, d.join().unwrap())
}

#[test]
fn every_mode_carries_a_stream_after_the_hmac_handshake() {
    let dir = temp_dir("modes");
    certs::generate(&dir, &[]).unwrap();
    let secret = Secret::from_bytes(SECRET);
    let (s, d) = exchange(tls(files(&dir, "source")), tls(files(&dir, "destination")));
    assert!(s.is_ok() && d.is_ok(), "tls: {s:?} {d:?}");
    let (s, d) = exchange(
        Protection::Psk(secret.clone()),
        Protection::Psk(secret.clone()),
    );
    assert!(s.is_ok() && d.is_ok(), "psk: {s:?} {d:?}");
    let (s, d) = exchange(
        Protection::InsecurePlaintext(secret.clone()),
        Protection::InsecurePlaintext(secret),
    );
    assert!(s.is_ok() && d.is_ok(), "plaintext: {s:?} {d:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_refuses_a_certificate_from_another_ca() {
    let (ours, theirs) = (temp_dir("ours"), temp_dir("theirs"));
    certs::generate(&ours, &[]).unwrap();
    certs::generate(&theirs, &[]).unwrap();
    // The intruder trusts our CA but holds a certificate of its own CA.
    let intruder = TlsFiles {
        ca: ours.join("ca.pem"),
        ..files(&theirs, "source")
    };
    let (s, d) = exchange(tls(intruder), tls(files(&ours, "destination")));
    assert!(matches!(d, Err(SecureError::TlsHandshake(_))), "{d:?}");
    assert!(s.is_err());
    // And a source does not talk to a destination of another CA.
    let (s, d) = exchange(
        tls(files(&ours, "source")),
        tls(files(&theirs, "destination")),
    );
    assert!(matches!(s, Err(SecureError::TlsHandshake(_))), "{s:?}");
    assert!(d.is_err());
    let _ = std::fs::remove_dir_all(&ours);
    let _ = std::fs::remove_dir_all(&theirs);
}

#[test]
fn keys_are_written_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("modes0600");
    let written = certs::generate(&dir, &["dst.example".into()]).unwrap();
    assert_eq!(written.len(), certs::FILES.len());
    for end in ["source.key", "destination.key"] {
        let mode = std::fs::metadata(dir.join(end))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{end}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_flipped_tls_byte_is_refused() {
    let dir = temp_dir("tlsflip");
    certs::generate(&dir, &[]).unwrap();
    let (src_cfg, dst_cfg) = (
        tls::TlsConfig::load(&files(&dir, "source")).unwrap(),
        tls::TlsConfig::load(&files(&dir, "destination")).unwrap(),
    );
    let (a, b) = tcp_pair();
    let (mut raw_b, c) = tcp_pair();
    // Relay: handshake both ways, then flip one byte of application data.
    let (mut a2, mut raw_b2) = (b.try_clone().unwrap(), raw_b.try_clone().unwrap());
    thread::spawn(move || std::io::copy(&mut raw_b2, &mut a2));
    let flip = thread::spawn(move || {
        // Far past the handshake (a few KiB): inside application data.
        const AT: usize = 100_000;
        let (mut b, mut seen) = (b, 0usize);
        let mut buf = [0u8; 65536];
        while let Ok(n @ 1..) = b.read(&mut buf) {
            if (seen..seen + n).contains(&AT) {
                buf[AT - seen] ^= 0x40;
            }
            seen += n;
            if raw_b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let d = thread::spawn(move || {
        let (mut s, _) = tls::server(c, &dst_cfg).unwrap();
        let mut buf = vec![0u8; 200_000];
        s.read_exact(&mut buf)
    });
    let (mut s, _) = tls::client(a, &src_cfg, "localhost").unwrap();
    let _ = s.write_all(&vec![7u8; 200_000]);
    let e = d.join().unwrap().unwrap_err();
    assert!(
        matches!(SecureError::of(&e), Some(SecureError::Tls(_))),
        "{e}"
    );
    drop(s);
    let _ = flip.join();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record that arrives in pieces, slower than the read timeout: the
/// reads that time out inside it (a [`DeadlineReader`] over the stream,
/// as the receiver's) lose nothing, and the next read goes on where it
/// stopped.
#[test]
fn a_read_timed_out_inside_a_record_goes_on_where_it_stopped() {
    use std::time::Duration;
    let (src_side, mut relay_a) = tcp_pair();
    let (mut relay_b, dst_side) = tcp_pair();
    let (mut back_b, mut back_a) = (relay_b.try_clone().unwrap(), relay_a.try_clone().unwrap());
    thread::spawn(move || std::io::copy(&mut back_b, &mut back_a));
    thread::spawn(move || {
        let hello = message(&mut relay_a).unwrap();
        relay_b.write_all(&hello).unwrap();
        let rec = message(&mut relay_a).unwrap();
        let half = rec.len() / 2;
        // Half the length, then half the record, then the rest.
        for piece in [&rec[..1], &rec[1..half], &rec[half..]] {
            relay_b.write_all(piece).unwrap();
            thread::sleep(Duration::from_millis(300));
        }
    });
    let dst = thread::spawn(move || noise::respond(dst_side, &Secret::from_bytes(SECRET)));
    let mut src = noise::initiate(src_side, &Secret::from_bytes(SECRET)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    src.write_all(&data).unwrap();
    let mut reader = DeadlineReader::new(dst, Duration::from_millis(100));
    let (mut got, mut n, mut timeouts) = (vec![0u8; data.len()], 0, 0);
    while n < data.len() {
        match reader.read(&mut got[n..]) {
            Ok(0) => panic!("the stream ended early"),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => timeouts += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(timeouts >= 2, "{timeouts} timeouts");
    assert_eq!(got, data);
}
