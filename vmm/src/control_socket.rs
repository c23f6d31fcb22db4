//! The control socket's file and its request lines: where [`crate::api`]
//! meets the file system and untrusted clients.
//!
//! 1. **One owner per path.** A path where a file or a live socket already
//!    exists is refused: binding over a live socket would steal it from a
//!    running `vmm` (its clients would silently reach us instead). A socket
//!    whose owner is gone (connecting is refused) is stale; `--force`
//!    removes it. Anything that is not a socket is never removed.
//! 2. **Mode 0600 from the first moment.** `bind` creates the socket file
//!    with the process umask, and `umask` is process-wide (changing it
//!    around `bind` would race with any other thread creating files). So the
//!    socket is bound inside a fresh directory of mode 0700 next to the
//!    target (only we can reach anything in it), made 0600 there, and only
//!    then renamed into place. `RENAME_NOREPLACE` keeps rule 1 even if
//!    something appeared at the path meanwhile. A socket stays reachable
//!    under its new name: `connect` finds it by its inode, not its first
//!    name.
//! 3. **The file goes with its owner.** [`SocketFile`] removes the path when
//!    dropped, unless the path no longer names our socket (someone replaced
//!    it).
//! 4. **Bounded requests.** A request line longer than
//!    [`MAX_REQUEST_BYTES`] is never read whole: [`read_request_line`] stops
//!    after that many bytes.

use std::io::{BufRead, ErrorKind, Read};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags};

/// Longest request line accepted, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// Why a control socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0}: a vmm is already serving this socket (stop it, or choose another path)")]
    Live(PathBuf),
    #[error("{0}: a stale socket from a vmm that is gone (--force removes it)")]
    Stale(PathBuf),
    #[error("{0}: a file that is not a socket is in the way (it is never removed)")]
    NotASocket(PathBuf),
    #[error("{0}: something was created there while the socket was being bound")]
    Taken(PathBuf),
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Why a request line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestLineError {
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

/// The socket file at a path, removed when this is dropped (rule 3). A
/// clone (for a thread that may have to exit the process) removes it too;
/// whichever comes second finds it gone and leaves the path alone.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of our socket, to recognise it at removal.
    id: (u64, u64),
}

impl SocketFile {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the path if it still names our socket.
    pub fn remove(&self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds a control socket at `path` with mode 0600 (see the module doc);
/// with `force`, a stale socket there is removed first.
pub fn bind(path: &Path, force: bool) -> Result<(UnixListener, SocketFile), SocketError> {
    clear_the_way(path, force)?;
    let io = |what| {
        let path = path.to_path_buf();
        move |source| SocketError::Io { path, what, source }
    };
    let private = private_dir(path).map_err(io("creating a private directory beside it"))?;
    let result = (|| {
        let inner = private.join("sock");
        let listener = UnixListener::bind(&inner).map_err(io("bind"))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod 0600"))?;
        renameat2(None, &inner, None, path, RenameFlags::RENAME_NOREPLACE).map_err(|e| {
            if e == nix::errno::Errno::EEXIST {
                SocketError::Taken(path.to_path_buf())
            } else {
                io("moving the socket into place")(e.into())
            }
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(io("stat"))?;
        let file = SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        };
        Ok((listener, file))
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Rule 1: refuses a live socket or any other file at `path`; removes a
/// stale socket if `force`.
fn clear_the_way(path: &Path, force: bool) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                path: path.to_path_buf(),
                what: "stat",
                source,
            })
        }
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::Live(path.to_path_buf())),
        Err(_) if force => std::fs::remove_file(path).map_err(|source| SocketError::Io {
            path: path.to_path_buf(),
            what: "removing the stale socket",
            source,
        }),
        Err(_) => Err(SocketError::Stale(path.to_path_buf())),
    }
}

/// A fresh directory of mode 0700 beside `path` (same file system, so the
/// socket can be renamed out of it).
fn private_dir(path: &Path) -> std::io::Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let dir = parent.join(format!(".{name}.{}.bind", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Reads one request line (without its newline) into `line`; `Ok(false)` at
/// the end of the stream. At most [`MAX_REQUEST_BYTES`] + 1 bytes are read
/// for one line, so a client cannot make us buffer without bound.
pub fn read_request_line(
    r: &mut impl BufRead,
    line: &mut String,
) -> Result<bool, RequestLineError> {
    let mut buf = Vec::new();
    let limit = MAX_REQUEST_BYTES as u64 + 1;
    let n = r.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_BYTES {
        return Err(RequestLineError::TooLong);
    }
    *line = String::from_utf8(buf).map_err(|_| RequestLineError::NotUtf8)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-ctlsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn socket_is_0600_and_removed_on_drop() {
        let d = scratch("mode");
        let p = d.join("a.sock");
        let (listener, file) = bind(&p, false).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&p).expect("reachable under its final name");
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temporary left"
        );
        drop((listener, file));
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn refusals_and_force() {
        let d = scratch("refuse");
        let p = d.join("a.sock");
        let live = bind(&p, false).unwrap();
        assert!(matches!(bind(&p, true), Err(SocketError::Live(_))));
        // A stale socket: the listener is gone but the file stays.
        let stale = d.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(matches!(bind(&stale, false), Err(SocketError::Stale(_))));
        let (_l, _f) = bind(&stale, true).unwrap();
        let file = d.join("file");
        std::fs::write(&file, "keep me").unwrap();
        assert!(matches!(bind(&file, true), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        drop(live);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn dropping_leaves_a_replacement_alone() {
        let d = scratch("replaced");
        let p = d.join("a.sock");
        let (_l, file) = bind(&p, false).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, "someone else's").unwrap();
        drop(file);
        assert!(p.exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn request_lines_are_bounded() {
        let mut line = String::new();
        let mut r = std::io::Cursor::new(b"{\"cmd\":\"state\"}\nlast".to_vec());
        assert!(read_request_line(&mut r, &mut line).unwrap());
        assert_eq!(line, "{\"cmd\":\"state\"}");
        assert!(read_request_line(&mut r, &mut line).unwrap());
        assert_eq!(line, "last");
        assert!(!read_request_line(&mut r, &mut line).unwrap());

        let exact = vec![b'x'; MAX_REQUEST_BYTES];
        let mut r = std::io::Cursor::new([exact.as_slice(), b"\n"].concat());
        assert!(read_request_line(&mut r, &mut line).unwrap());
        assert_eq!(line.len(), MAX_REQUEST_BYTES);

        let mut r = std::io::Cursor::new(vec![b'x'; MAX_REQUEST_BYTES + 1]);
        assert!(matches!(
            read_request_line(&mut r, &mut line),
            Err(RequestLineError::TooLong)
        ));
        assert_eq!(
            r.position() as usize,
            MAX_REQUEST_BYTES + 1,
            "no read past the bound"
        );

        let mut r = std::io::Cursor::new(b"\xff\n".to_vec());
        assert!(matches!(
            read_request_line(&mut r, &mut line),
            Err(RequestLineError::NotUtf8)
        ));
    }
}
