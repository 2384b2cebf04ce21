//! The one error type of the crate. Every variant displays as one line; everything read from an
//! image is untrusted, so malformed input always ends up here rather than in a panic.

/// Errors from opening an image, reading its partitions and filesystems, and finding a kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("truncated image: {len} bytes at offset {offset} are past its end ({size} bytes)")]
    Truncated { offset: u64, len: u64, size: u64 },
    #[error("corrupt qcow2 image: {0}")]
    CorruptQcow2(String),
    #[error("unsupported qcow2 image: {0}")]
    UnsupportedQcow2(String),
    #[error("corrupt partition table: {0}")]
    CorruptPartitionTable(String),
    #[error(
        "partition {index} (bytes {start}..{end}) extends beyond the end of the image ({size} bytes)"
    )]
    PartitionBeyondEnd {
        index: u32,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error(
        "{0}: no partition table and no filesystem recognised (looked for GPT, MBR, ext2/3/4, FAT)"
    )]
    NoFilesystem(String),
    #[error("{0}: partitions found but none holds a recognised filesystem (ext2/3/4, FAT)")]
    NoFilesystemInPartitions(String),
    #[error("corrupt filesystem: {0}")]
    CorruptFs(String),
    #[error("no kernel found; looked for: {0}")]
    NoKernel(String),
    #[error("boot entry {wanted:?} not found; entries: {available}")]
    EntryNotFound { wanted: String, available: String },
    #[error("symlink loop (or more than {limit} symlinks) resolving {path}")]
    SymlinkLoop { path: String, limit: u32 },
    #[error("{path} is {size} bytes, larger than the limit of {max} bytes")]
    FileTooBig { path: String, size: u64, max: u64 },
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("bad path {0:?}")]
    BadPath(String),
    #[error("{path}: {msg}")]
    BadConfig { path: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_is_one_line() {
        let errs = [
            Error::io("disk.img", std::io::Error::other("boom")),
            Error::Truncated {
                offset: 1,
                len: 2,
                size: 3,
            },
            Error::CorruptQcow2("bad L1".into()),
            Error::PartitionBeyondEnd {
                index: 1,
                start: 0,
                end: 10,
                size: 5,
            },
            Error::NoFilesystem("x".into()),
            Error::NoKernel("/vmlinuz, /boot/vmlinuz".into()),
            Error::SymlinkLoop {
                path: "/a".into(),
                limit: 40,
            },
            Error::FileTooBig {
                path: "/k".into(),
                size: 10,
                max: 5,
            },
        ];
        for e in errs {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
            assert!(!s.is_empty());
        }
    }
}
