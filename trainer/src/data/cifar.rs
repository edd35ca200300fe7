//! Reading the official binary files. Each record is the label byte(s) and then 3,072 pixel
//! bytes: the 1,024 red values of the 32x32 image row by row, then green, then blue.

use std::path::{Path, PathBuf};

use crds::Dataset;

/// Pixel bytes of one 3x32x32 image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path} does not exist: {hint}")]
    Missing { path: PathBuf, hint: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is truncated or corrupt: {len} bytes is not a whole number of {record}-byte {kind} records")]
    Truncated {
        path: PathBuf,
        len: u64,
        record: usize,
        kind: Dataset,
    },
    #[error("{path} is empty: expected {kind} records")]
    Empty { path: PathBuf, kind: Dataset },
    #[error(
        "{path} is corrupt: record {index} has label {label}, but {kind} has {classes} classes"
    )]
    BadLabel {
        path: PathBuf,
        index: usize,
        label: u8,
        kind: Dataset,
        classes: usize,
    },
    #[error("{path} is truncated or corrupt: it holds {found} records where {expected_from} holds {expected}")]
    Inconsistent {
        path: PathBuf,
        found: usize,
        expected_from: PathBuf,
        expected: usize,
    },
    #[error("cannot hold out {validation} validation images from {total}: both sides need images")]
    Split { validation: usize, total: usize },
}

/// How the official binary release of a data set is laid out: which files, in which folder,
/// with how many label bytes before each image.
pub trait BinaryFormat: Copy {
    /// The folder the official archive unpacks to.
    fn folder(self) -> &'static str;
    fn training_files(self) -> &'static [&'static str];
    fn test_file(self) -> &'static str;
    /// Label bytes before the pixels: CIFAR-100 has a coarse and a fine label; we use the fine.
    fn label_bytes(self) -> usize;

    fn record_bytes(self) -> usize {
        self.label_bytes() + IMAGE_BYTES
    }
}

impl BinaryFormat for Dataset {
    fn folder(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar-10-batches-bin",
            Dataset::Cifar100 => "cifar-100-binary",
        }
    }

    fn training_files(self) -> &'static [&'static str] {
        match self {
            Dataset::Cifar10 => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            Dataset::Cifar100 => &["train.bin"],
        }
    }

    fn test_file(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "test_batch.bin",
            Dataset::Cifar100 => "test.bin",
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Dataset::Cifar10 => 1,
            Dataset::Cifar100 => 2,
        }
    }
}

/// Images as stored: bytes, channel-major, with their labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Images {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
}

impl Images {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, index: usize) -> &[u8] {
        &self.pixels[index * IMAGE_BYTES..(index + 1) * IMAGE_BYTES]
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u32)> {
        self.pixels
            .chunks_exact(IMAGE_BYTES)
            .zip(self.labels.iter().copied())
    }

    pub fn select(&self, indices: &[usize]) -> Images {
        let mut out = Images {
            pixels: Vec::with_capacity(indices.len() * IMAGE_BYTES),
            labels: Vec::with_capacity(indices.len()),
        };
        for &i in indices {
            out.pixels.extend_from_slice(self.image(i));
            out.labels.push(self.labels[i]);
        }
        out
    }

    /// The first `n` images (all if fewer), for quick evaluations and benchmarks.
    pub fn take(&self, n: usize) -> Images {
        let n = n.min(self.len());
        Images {
            pixels: self.pixels[..n * IMAGE_BYTES].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }
}

/// The folder holding `kind`'s files: `dir` itself, or the official folder inside it.
pub(crate) fn resolve(dir: &Path, kind: Dataset) -> PathBuf {
    let nested = dir.join(kind.folder());
    if !dir.join(kind.test_file()).exists()
        && !dir.join(kind.training_files()[0]).exists()
        && nested.is_dir()
    {
        nested
    } else {
        dir.to_path_buf()
    }
}

fn hint(kind: Dataset) -> String {
    format!(
        "point the data folder at the unpacked official {kind} binary files (the {} folder or its parent)",
        kind.folder()
    )
}

pub(crate) fn read_file(path: &Path, kind: Dataset) -> Result<Images, DataError> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
                hint: hint(kind),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let record = kind.record_bytes();
    if bytes.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            kind,
        });
    }
    if bytes.len() % record != 0 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            record,
            kind,
        });
    }
    let n = bytes.len() / record;
    let mut images = Images {
        pixels: Vec::with_capacity(n * IMAGE_BYTES),
        labels: Vec::with_capacity(n),
    };
    let label_at = kind.label_bytes() - 1;
    for (index, chunk) in bytes.chunks_exact(record).enumerate() {
        let label = chunk[label_at];
        if usize::from(label) >= kind.classes() {
            return Err(DataError::BadLabel {
                path: path.to_path_buf(),
                index,
                label,
                kind,
                classes: kind.classes(),
            });
        }
        images.labels.push(u32::from(label));
        images
            .pixels
            .extend_from_slice(&chunk[kind.label_bytes()..]);
    }
    Ok(images)
}

/// All training files of `kind`, concatenated in file order.
pub(crate) fn read_training(dir: &Path, kind: Dataset) -> Result<Images, DataError> {
    let dir = resolve(dir, kind);
    let mut all = Images::default();
    let mut first: Option<(PathBuf, usize)> = None;
    for name in kind.training_files() {
        let path = dir.join(name);
        let images = read_file(&path, kind)?;
        // The batches of one release all hold the same number of records; one that holds
        // fewer was cut at a record boundary.
        match &first {
            None => first = Some((path.clone(), images.len())),
            Some((first_path, expected)) if *expected != images.len() => {
                return Err(DataError::Inconsistent {
                    path,
                    found: images.len(),
                    expected_from: first_path.clone(),
                    expected: *expected,
                })
            }
            Some(_) => {}
        }
        all.pixels.extend_from_slice(&images.pixels);
        all.labels.extend_from_slice(&images.labels);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixture;

    /// The error of reading a 5-record fixture after `edit` changed the bytes of `file`.
    fn error_after(file: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
        let dir = tempfile::tempdir().unwrap();
        fixture::write(dir.path(), Dataset::Cifar10, 5, 0).unwrap();
        let path = dir.path().join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        read_training(dir.path(), Dataset::Cifar10)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn reads_both_formats() {
        for kind in [Dataset::Cifar10, Dataset::Cifar100] {
            let dir = tempfile::tempdir().unwrap();
            fixture::write(dir.path(), kind, 30, 4).unwrap();
            let images = read_training(dir.path(), kind).unwrap();
            assert_eq!(images.len(), 30 * kind.training_files().len());
            assert!(images.labels.iter().all(|&l| (l as usize) < kind.classes()));
        }
    }

    #[test]
    fn finds_the_official_folder_inside_the_given_one() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("cifar-10-batches-bin");
        fixture::write(&inner, Dataset::Cifar10, 3, 0).unwrap();
        assert_eq!(
            read_training(dir.path(), Dataset::Cifar10).unwrap().len(),
            15
        );
    }

    #[test]
    fn truncated_file_is_named() {
        let msg = error_after("data_batch_3.bin", |b| b.truncate(b.len() - 100));
        assert!(
            msg.contains("data_batch_3.bin") && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn file_cut_at_a_record_boundary_is_named() {
        let msg = error_after("data_batch_4.bin", |b| b.truncate(3 * 3073));
        assert!(
            msg.contains("data_batch_4.bin") && msg.contains("3 records"),
            "{msg}"
        );
    }

    #[test]
    fn missing_file_is_named_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let msg = read_training(dir.path(), Dataset::Cifar10)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("data_batch_1.bin") && msg.contains("does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn bad_label_is_named() {
        let msg = error_after("data_batch_2.bin", |b| b[2 * 3073] = 200);
        assert!(
            msg.contains("data_batch_2.bin") && msg.contains("record 2"),
            "{msg}"
        );
    }
}
