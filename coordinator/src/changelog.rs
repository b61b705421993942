//! The run's change log as the coordinator reads it (see `schemashift_changelog::table`).

use crate::error::CoordinatorError;
use crate::run::RunCtx;
use schemashift_changelog::ChangeLog;
pub use schemashift_changelog::LogHead;
use schemashift_common::change::Change;

impl RunCtx {
    fn log(&self) -> ChangeLog<'_> {
        ChangeLog::of(&self.plan.changelog, &self.store.sql)
    }

    /// Where each partition's log ends now.
    pub async fn log_head(&self) -> Result<LogHead, CoordinatorError> {
        Ok(self.log().head(&self.target).await?)
    }

    /// The changes after `from` up to `to`, per partition.
    pub async fn log_between(
        &self,
        from: &LogHead,
        to: &LogHead,
    ) -> Result<Vec<Change>, CoordinatorError> {
        Ok(self.log().between(&self.target, from, to).await?)
    }
}
