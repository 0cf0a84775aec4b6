//! How handlers fail: a [`Reject`](Fail::Reject) is a normal answer (an
//! `Error` response, the command changes nothing); a storage error aborts.

use natter_kv::KvError;

use crate::pb::{self, ErrorCode};

/// A handler's failure.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The command or query is refused; answered with this error.
    Reject(pb::Error),
    /// Storage failed or a stored row is corrupt.
    Kv(KvError),
}

impl From<KvError> for Fail {
    fn from(e: KvError) -> Self {
        Fail::Kv(e)
    }
}

pub(crate) type Res<T> = Result<T, Fail>;

fn reject(code: ErrorCode, message: impl Into<String>) -> Fail {
    Fail::Reject(pb::Error {
        code: code as i32,
        message: message.into(),
    })
}

pub(crate) fn invalid(message: impl Into<String>) -> Fail {
    reject(ErrorCode::InvalidArgument, message)
}

pub(crate) fn not_found(message: impl Into<String>) -> Fail {
    reject(ErrorCode::NotFound, message)
}

pub(crate) fn denied(message: impl Into<String>) -> Fail {
    reject(ErrorCode::PermissionDenied, message)
}

pub(crate) fn exists(message: impl Into<String>) -> Fail {
    reject(ErrorCode::AlreadyExists, message)
}

pub(crate) fn limit(message: impl Into<String>) -> Fail {
    reject(ErrorCode::LimitExceeded, message)
}

pub(crate) fn precondition(message: impl Into<String>) -> Fail {
    reject(ErrorCode::FailedPrecondition, message)
}

/// The answer to anything about a conversation the caller may not see: the
/// same whether it doesn't exist, was deleted, or the caller isn't a member.
pub(crate) fn no_conversation() -> Fail {
    not_found("conversation not found")
}
