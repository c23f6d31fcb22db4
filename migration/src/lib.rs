//! Live migration of a running VM from one VMM process to another over TCP.
//!
//! The phases, one module each:
//! - [`protocol`]: framing and the message sequence (read its rustdoc first);
//! - [`auth`]: shared-secret challenge–response before anything else;
//! - [`codec`]: how pages travel (a table, then bodies: zero flag, raw, lz4);
//! - [`precopy`]: dirty-log rounds while the guest runs, and the stop rules;
//! - [`stop_and_copy`]: pause, last dirty pages, machine state, switch-over;
//! - [`receive`]: the destination; [`placement`]: page batches received
//!   straight into guest RAM;
//! - [`report`]: what a migration measured.
//!
//! The engine does not know how the VMM is built: it drives a [`SourceVm`]
//! and a [`DestinationVm`], two small traits the VMM implements.

pub mod access_rate;
pub mod auth;
pub mod codec;
pub mod endpoint;
pub mod model;
pub mod placement;
pub mod postcopy;
pub mod precopy;
pub mod protocol;
pub mod rate_limit;
pub mod receive;
pub mod report;
pub mod source;
pub mod stop_and_copy;
pub mod transport;
pub mod uffd;
pub mod verify;

pub use endpoint::{BoxError, DestinationVm, SourceVm};
pub use report::Report;
pub use source::{migrate, MigrationError, Mode, Options, Progress};
