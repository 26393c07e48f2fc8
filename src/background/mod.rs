//! What a manager does in the background, on any storage: writing recorded accesses in
//! batches (`touches`) and deleting expired sessions (`cleanup`). The coherence layer has
//! tasks of its own (`crate::coherence`); all of them are [`Task`]s the manager runs and stops.

pub(crate) mod cleanup;
pub(crate) mod touches;

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;

/// A background task: its name (for shutdown's report) and its work, which ends when the
/// manager's cancellation token fires.
pub(crate) struct Task {
    pub name: &'static str,
    pub work: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
}

impl Task {
    pub(crate) fn new(
        name: &'static str,
        work: impl Future<Output = Result<()>> + Send + 'static,
    ) -> Task {
        Task {
            name,
            work: Box::pin(work),
        }
    }
}
