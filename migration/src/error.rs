//! The errors of a migration, shared by both ends and every phase, and how
//! each one is told to the peer as a typed [`Abort`].

use std::time::Duration;

use crate::auth::AuthError;
use crate::control::Cancelled;
use crate::endpoint::BoxError;
use crate::policy::PolicyError;
use crate::protocol::{Abort, AbortCode, ProtocolError};
use crate::secure::SecureError;
use crate::state::IllegalTransition;
use crate::transport::TransportError;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Secure(#[from] SecureError),
    #[error("VMM operation '{what}' failed")]
    Vm {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("The migration policy failed")]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    State(#[from] IllegalTransition),
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    #[error(
        "The source stayed paused longer than the downtime limit ({limit:?}) plus the margin \
         ({margin:?}) without the destination's confirmation: the migration was aborted and \
         the source guest resumed"
    )]
    PauseExceeded { limit: Duration, margin: Duration },
    #[error("Verification failed: {0} pages differ between source and destination")]
    Mismatch(u64),
    #[error("The guest's own verification failed on the destination: {0}")]
    GuestVerification(String),
    #[error("{count} pages the source declared never arrived (first runs: {first:?}): refusing to resume")]
    Undelivered { count: u64, first: Vec<(u64, u64)> },
    #[error("The source announced --verify but its checksums never arrived: refusing to resume")]
    ChecksumsMissing,
    #[error("The guest was discarded here before Commit arrived (the source asked, or the link died): it never ran here")]
    Discarded,
    /// The source sent `Commit` and cannot tell whether the destination
    /// resumed: it keeps the guest paused (fenced) and says so.
    #[error("outcome unknown: the guest is paused here; run `vmm migrate --recover --api-socket SOCKET --to {to} --secret FILE` or check the destination ({why})")]
    OutcomeUnknown { to: String, why: String },
    /// Post-copy lost its link after `Commit`: the guest runs on the
    /// destination with pages missing; the source keeps every page, paused.
    #[error("post-copy lost the destination after the switch-over ({0}): the guest is paused here, fenced, with every page; it is never resumed here while the destination may run it")]
    PostcopyFenced(String),
    #[error("Post-copy lost its source: {count} pages never arrived (first: {first:?}); {}", if *.paused { "the guest is paused" } else { "the guest could not be fully paused (vCPUs asleep on missing pages)" })]
    MissingPages {
        count: u64,
        first: Vec<u64>,
        paused: bool,
    },
}

impl MigrationError {
    /// The `Abort` that tells the peer about this error; `side` is the
    /// code for a failure of this end without a more specific one.
    pub fn to_abort(&self, side: AbortCode) -> Abort {
        match self {
            Self::Mismatch(n) => Abort::new(AbortCode::PagesDiffer, *n, ""),
            Self::GuestVerification(d) => Abort::new(AbortCode::GuestVerification, 0, d),
            Self::Cancelled(_) => Abort::new(AbortCode::Cancelled, 0, "cancelled by the user"),
            other => Abort::new(side, 0, &other.to_string()),
        }
    }

    /// Whether the source is fenced: it sent `Commit`, so it must not
    /// resume the guest until the destination says it discarded it.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. } | Self::PostcopyFenced(_))
    }

    /// Whether the migration stopped because it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled(_))
    }

    /// The error an `Abort` from the peer stands for: verification results
    /// keep their meaning, anything else is the peer's failure.
    pub fn from_abort(abort: Abort) -> Self {
        match abort.code {
            AbortCode::PagesDiffer => Self::Mismatch(abort.count),
            AbortCode::GuestVerification => Self::GuestVerification(abort.to_string()),
            _ => ProtocolError::PeerAborted(abort).into(),
        }
    }
}

/// Wraps a VMM error with what was being done.
pub fn vm_err(what: &'static str) -> impl FnOnce(BoxError) -> MigrationError {
    move |source| MigrationError::Vm { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_results_survive_the_trip_as_codes() {
        let sent = MigrationError::Mismatch(7).to_abort(AbortCode::DestinationFailed);
        let back = Abort::decode(&sent.encode()).unwrap();
        assert!(matches!(
            MigrationError::from_abort(back),
            MigrationError::Mismatch(7)
        ));
        let other = MigrationError::from_abort(Abort::new(AbortCode::DestinationFailed, 0, "x"));
        assert!(
            other.to_string().contains("destination failed: x"),
            "{other}"
        );
    }
}
