//! MySQL 8.0+ and MariaDB 10.6+ (being written).
use std::sync::Arc;

use super::*;

/// Placeholder.
pub fn mysql_unavailable(_code: u16) -> bool {
    false
}
/// Placeholder.
pub fn mysql_retryable(_code: u16) -> bool {
    false
}
pub(super) fn error_kind(_code: u16) -> Option<fn(String) -> StoreError> {
    None
}
/// Placeholder.
pub struct MySqlStore;
impl MySqlStore {
    /// Placeholder.
    pub async fn connect(
        _url: &str,
        _migrate: bool,
    ) -> StoreResult<Arc<super::sqlite::SqliteStore>> {
        Err(StoreError::Internal("mysql: not yet".into()))
    }
}
