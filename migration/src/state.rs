//! The two ends of a migration as state machines: every phase is a
//! variant carrying what it knows, and every legal move is one arm of a
//! `match` (drawn beside the message sequence in [`crate::protocol`]).
//! Anything else is an [`IllegalTransition`]: a peer that sends a message
//! out of turn, or an engine bug, fails the migration instead of being
//! half-handled.

use crate::policy::{AfterRound, Start, StopRule};
use crate::protocol::Kind;

/// A move a state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unexpected {got} in phase {phase}")]
pub struct IllegalTransition {
    pub phase: &'static str,
    pub got: &'static str,
}

/// The source's phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Connecting and authenticating.
    Handshake,
    /// `Config` sent; measuring and planning.
    Setup,
    /// Pre-copy round `round` is next (or running).
    Rounds { round: u32, start: Start },
    /// The vCPUs are paused: the rest and the state go over; with
    /// `postcopy` the destination resumes before every page is there.
    SwitchOver {
        rule: Option<StopRule>,
        postcopy: bool,
    },
    /// `Commit` was written: the source is fenced, it never runs the guest
    /// again; it waits for `Resumed` (or asks the destination).
    Committed { postcopy: bool },
    /// The destination runs the guest; the source pushes and serves faults.
    Postcopy,
    /// The destination confirmed: the guest lives there now.
    Completed,
    /// Something failed before `Commit`: the source runs on.
    Failed,
    /// Something failed after `Commit`: the source stays fenced (paused,
    /// every page kept) until the destination tells what it did.
    OutcomeUnknown,
    /// Cancelled before the switch-over; the source runs on.
    Cancelled,
}

/// What moves the source's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEvent {
    Authenticated,
    /// The policy planned the start.
    Planned(Start),
    /// A pre-copy round ended with the policy's decision.
    RoundEnded(AfterRound),
    /// The source wrote `Commit` (after the destination's `Prepared`).
    Commit,
    /// The destination answered `Resumed`.
    Resumed,
    /// The destination answered `PostcopyComplete`.
    PostcopyComplete,
    /// The user cancelled.
    Cancel,
    /// An error.
    Fail,
}

impl SourcePhase {
    /// The phase after `event`, if that move is legal.
    pub fn next(self, event: SourceEvent) -> Result<Self, IllegalTransition> {
        use SourceEvent as E;
        use SourcePhase as P;
        Ok(match (self, event) {
            (P::Handshake, E::Authenticated) => P::Setup,
            (P::Setup, E::Planned(Start::PostCopy)) => P::SwitchOver {
                rule: None,
                postcopy: true,
            },
            (P::Setup, E::Planned(start)) => P::Rounds { round: 0, start },
            (P::Rounds { round, start }, E::RoundEnded(decision)) => match decision {
                AfterRound::Continue { .. } => P::Rounds {
                    round: round + 1,
                    start,
                },
                AfterRound::StopAndCopy { rule } => P::SwitchOver {
                    rule: Some(rule),
                    postcopy: false,
                },
                AfterRound::PostCopy { rule } => P::SwitchOver {
                    rule: Some(rule),
                    postcopy: true,
                },
            },
            (P::SwitchOver { postcopy, .. }, E::Commit) => P::Committed { postcopy },
            (P::Committed { postcopy: false }, E::Resumed) => P::Completed,
            (P::Committed { postcopy: true }, E::Resumed) => P::Postcopy,
            (P::Postcopy, E::PostcopyComplete) => P::Completed,
            (P::Handshake | P::Setup | P::Rounds { .. } | P::SwitchOver { .. }, E::Cancel) => {
                P::Cancelled
            }
            (P::Committed { .. } | P::Postcopy, E::Fail) => P::OutcomeUnknown,
            (p, E::Fail) if !p.is_final() => P::Failed,
            (p, e) => {
                return Err(IllegalTransition {
                    phase: p.name(),
                    got: e.name(),
                })
            }
        })
    }

    /// Whether the machine has stopped.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::OutcomeUnknown
        )
    }

    /// The phase's name, for errors and progress.
    pub fn name(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Setup => "setup",
            Self::Rounds { .. } => "pre-copy",
            Self::SwitchOver { .. } => "switch-over",
            Self::Committed { .. } => "committed",
            Self::Postcopy => "post-copy",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::OutcomeUnknown => "outcome unknown",
            Self::Cancelled => "cancelled",
        }
    }
}

impl SourceEvent {
    fn name(self) -> &'static str {
        match self {
            Self::Authenticated => "authentication",
            Self::Planned(_) => "plan",
            Self::RoundEnded(_) => "end of a round",
            Self::Commit => "Commit",
            Self::Resumed => "Resumed",
            Self::PostcopyComplete => "PostcopyComplete",
            Self::Cancel => "cancel",
            Self::Fail => "failure",
        }
    }
}

/// The destination's phases, driven by the frames that arrive on the main
/// connection after `Ready` (the handshake and `Config` come first, in
/// that order, before the machine starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationPhase {
    /// Pages, calibration probes and round ends.
    Rounds,
    /// The machine state is restored; checksums may come.
    Restored,
    /// `PostcopyBegin` arrived: post-copy is armed; only `Complete` follows.
    PostcopyArmed,
    /// `Complete` checked and `Prepared` sent: paused, waiting for `Commit`
    /// (never resumes without it).
    Prepared { postcopy: bool },
    /// The guest runs here; pushed pages arrive until `PostcopyDone`.
    Postcopy,
    /// Every page is here and the guest runs.
    Completed,
    /// The source aborted.
    Failed,
}

impl DestinationPhase {
    /// The phase after a frame of `kind`, if the protocol allows it here.
    pub fn on_frame(self, kind: Kind) -> Result<Self, IllegalTransition> {
        use DestinationPhase as P;
        Ok(match (self, kind) {
            (P::Rounds, Kind::Pages | Kind::Probe | Kind::RoundEnd) => P::Rounds,
            (P::Rounds, Kind::State) => P::Restored,
            (P::Restored, Kind::Checksums) => P::Restored,
            (P::Restored, Kind::PostcopyBegin) => P::PostcopyArmed,
            (P::Restored, Kind::Complete) => P::Prepared { postcopy: false },
            (P::PostcopyArmed, Kind::Complete) => P::Prepared { postcopy: true },
            (P::Prepared { postcopy: false }, Kind::Commit) => P::Completed,
            (P::Prepared { postcopy: true }, Kind::Commit) => P::Postcopy,
            (P::Postcopy, Kind::Pages) => P::Postcopy,
            (P::Postcopy, Kind::PostcopyDone) => P::Completed,
            (p, Kind::Abort) if p != P::Completed => P::Failed,
            (p, k) => {
                return Err(IllegalTransition {
                    phase: p.name(),
                    got: k.name(),
                })
            }
        })
    }

    /// The phase's name, for errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rounds => "rounds",
            Self::Restored => "restored",
            Self::PostcopyArmed => "post-copy armed",
            Self::Prepared { .. } => "prepared",
            Self::Postcopy => "post-copy",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Throttle;

    const GO_ON: AfterRound = AfterRound::Continue {
        throttle: Throttle::Unchanged,
    };

    fn walk(events: &[SourceEvent]) -> Result<SourcePhase, IllegalTransition> {
        events
            .iter()
            .try_fold(SourcePhase::Handshake, |p, &e| p.next(e))
    }

    #[test]
    fn source_pre_copy_and_hybrid_paths() {
        use SourceEvent::*;
        let pre = [
            Authenticated,
            Planned(Start::PreCopy),
            RoundEnded(GO_ON),
            RoundEnded(AfterRound::StopAndCopy {
                rule: StopRule::Downtime,
            }),
            Commit,
            Resumed,
        ];
        assert_eq!(walk(&pre), Ok(SourcePhase::Completed));
        assert_eq!(
            walk(&pre[..3]),
            Ok(SourcePhase::Rounds {
                round: 1,
                start: Start::PreCopy
            })
        );
        let hybrid = [
            Authenticated,
            Planned(Start::Hybrid { precopy_bytes: 1 }),
            RoundEnded(AfterRound::PostCopy {
                rule: StopRule::Threshold,
            }),
            Commit,
            Resumed,
            PostcopyComplete,
        ];
        assert_eq!(walk(&hybrid[..5]), Ok(SourcePhase::Postcopy));
        assert_eq!(walk(&hybrid), Ok(SourcePhase::Completed));
        let post = [Authenticated, Planned(Start::PostCopy), Commit, Resumed];
        assert_eq!(walk(&post), Ok(SourcePhase::Postcopy));
    }

    #[test]
    fn source_refuses_illegal_moves() {
        use SourceEvent::*;
        assert!(
            walk(&[Planned(Start::PreCopy)]).is_err(),
            "plan before auth"
        );
        assert!(walk(&[Authenticated, Resumed]).is_err(), "resumed in setup");
        assert!(walk(&[Authenticated, RoundEnded(GO_ON)]).is_err());
        let post = [
            Authenticated,
            Planned(Start::PostCopy),
            Commit,
            Resumed,
            Cancel,
        ];
        assert!(walk(&post).is_err(), "no cancel after the switch-over");
        assert!(
            walk(&post[..3]).unwrap().next(Cancel).is_err(),
            "no cancel after Commit"
        );
        assert!(
            walk(&post[..2]).unwrap().next(Resumed).is_err(),
            "Resumed before Commit"
        );
        // After Commit a failure never means "resume": the outcome is unknown.
        for n in [3, 4] {
            assert_eq!(
                walk(&post[..n]).unwrap().next(Fail),
                Ok(SourcePhase::OutcomeUnknown)
            );
        }
        assert_eq!(
            walk(&post[..2]).unwrap().next(Fail),
            Ok(SourcePhase::Failed)
        );
        assert!(SourcePhase::Completed.next(Fail).is_err());
        assert!(SourcePhase::Failed.next(Authenticated).is_err());
        assert_eq!(walk(&[Authenticated, Cancel]), Ok(SourcePhase::Cancelled));
    }

    fn feed(kinds: &[Kind]) -> Result<DestinationPhase, IllegalTransition> {
        kinds
            .iter()
            .try_fold(DestinationPhase::Rounds, |p, &k| p.on_frame(k))
    }

    #[test]
    fn destination_legal_sequences() {
        use Kind::*;
        let pre = [
            Pages, RoundEnd, Pages, RoundEnd, State, Checksums, Complete, Commit,
        ];
        assert_eq!(feed(&pre), Ok(DestinationPhase::Completed));
        assert_eq!(
            feed(&pre[..7]),
            Ok(DestinationPhase::Prepared { postcopy: false })
        );
        assert_eq!(feed(&pre[..4]), Ok(DestinationPhase::Rounds));
        let post = [
            State,
            PostcopyBegin,
            Complete,
            Commit,
            Pages,
            Pages,
            PostcopyDone,
        ];
        assert_eq!(feed(&post), Ok(DestinationPhase::Completed));
        assert_eq!(feed(&[Pages, Abort]), Ok(DestinationPhase::Failed));
        assert_eq!(feed(&[Probe, RoundEnd]), Ok(DestinationPhase::Rounds));
    }

    #[test]
    fn destination_refuses_out_of_turn_frames() {
        use Kind::*;
        for bad in [
            &[Complete][..],                    // complete before the state
            &[State, Pages],                    // pages after the state (pre-copy)
            &[State, State],                    // the state twice
            &[State, PostcopyBegin, Checksums], // checksums after arming
            &[Checksums],                       // checksums before the state
            &[PostcopyDone],
            &[Config],
            &[State, Complete, Commit, Abort], // nothing after completion
            &[State, Commit],                  // Commit before Prepared
            &[State, Complete, Pages],         // pages while prepared
            &[State, Complete, Complete],
        ] {
            let err = feed(bad).unwrap_err();
            assert!(!err.to_string().is_empty(), "{bad:?}");
        }
    }
}
