//! The one table from what a handler can fail with to the gRPC status a client sees.

use tonic::Status;
use tracing::error;

use crate::key::FieldError;
use crate::store::{PutError, StoreError};

/// Everything a handler can fail with; [`to_status`] is the one place it becomes a `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("purge incomplete: shards {shards:?} could not be reached ({removed} objects removed elsewhere); retry")]
    PurgeIncomplete { shards: Vec<String>, removed: u64 },
}

/// Maps errors to a small set of codes and logs the internal ones.
pub fn to_status(e: ServiceError) -> Status {
    match &e {
        ServiceError::Field(_) => Status::invalid_argument(e.to_string()),
        ServiceError::PurgeIncomplete { .. } => Status::unavailable(e.to_string()),
        ServiceError::Store(s) => match s {
            StoreError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
            StoreError::Shard(_) | StoreError::Lost => Status::unavailable(e.to_string()),
            StoreError::Changed => Status::aborted(e.to_string()),
            StoreError::Layout(_) | StoreError::Internal(_) => {
                error!(error = %e, "internal error");
                Status::internal(e.to_string())
            }
        },
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        to_status(e)
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        to_status(e.into())
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        to_status(e.into())
    }
}

/// A request field that is missing or wrong: `INVALID_ARGUMENT` naming it.
pub fn field(name: &str, message: impl Into<String>) -> Status {
    FieldError::new(name, message).into()
}

/// How a Put that ended early is answered: a refusal is a normal response, anything else an
/// error status.
pub enum PutEnd {
    Answer(crate::proto::PutOutcome),
    Status(Status),
}

impl From<PutError> for PutEnd {
    fn from(e: PutError) -> Self {
        match e {
            PutError::Refused(outcome) => PutEnd::Answer(outcome),
            PutError::Failed(e) => PutEnd::Status(e.into()),
        }
    }
}

impl From<Status> for PutEnd {
    fn from(status: Status) -> Self {
        PutEnd::Status(status)
    }
}

impl From<FieldError> for PutEnd {
    fn from(e: FieldError) -> Self {
        PutEnd::Status(e.into())
    }
}
