//! Live migration of a running VM from one VMM process to another over TCP.
//!
//! The crate reads bottom-up; no module imports one above it:
//! 1. the wire and the pages: [`protocol`] (framing, the message sequence
//!    and both ends' state machines — read its rustdoc first), [`auth`],
//!    [`secure`] (the protected stream: TLS, Noise or plaintext),
//!    [`codec`], [`bitmap`], [`transport`], [`rate_limit`], [`uffd`];
//! 2. the kit every phase shares: [`error`], [`options`], [`report`],
//!    [`state`] (the state machines), [`policy`] (the decisions),
//!    [`control`] (cancel and new limits from another thread),
//!    [`events`] (what happened, for scripts),
//!    [`sender`] (the page sender);
//! 3. the phases: [`precopy`], [`postcopy`], [`stop_and_copy`] (pause,
//!    last pages, machine state, switch-over), [`commit`] (the switch-over's
//!    single decision, and asking for its outcome afterwards);
//! 4. the ends: [`source`] orchestrates the phases; [`receive`] is the
//!    destination ([`placement`]: page batches received straight into
//!    guest RAM).
//!
//! The engine does not know how the VMM is built: it drives a [`SourceVm`]
//! and a [`DestinationVm`], two small traits the VMM implements.

pub mod access_rate;
pub mod auth;
pub mod bitmap;
pub mod codec;
pub mod commit;
pub mod control;
pub mod deadline;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod model;
pub mod options;
pub mod pause_bound;
pub mod placement;
pub mod policy;
pub mod postcopy;
pub mod precopy;
pub mod protocol;
pub mod rate_limit;
pub mod receive;
pub mod report;
pub mod secure;
pub mod sender;
pub mod source;
pub mod state;
pub mod stop_and_copy;
pub mod transport;
pub mod uffd;
pub mod verify;

pub use control::{Control, ControlHandle, ParameterChange};
pub use endpoint::{BoxError, DestinationVm, SourceVm};
pub use error::MigrationError;
pub use options::{Mode, Options, Overrun, Split};
pub use report::Report;
pub use sender::{Progress, ProgressHandle};
pub use source::{migrate, migrate_controlled, migrate_with_policy};
