//! MNIST-style data: the IDX file format (plain or gzip'd), checked strictly, and the data set
//! as one normalised `(N, 1, 32, 32)` tensor. Python's twin: `load_idx` in `scripts/lenet5_ref.py`.

pub mod handwriting;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::model::INPUT_SIZE;

/// Side of an MNIST image as stored in the IDX files.
pub const IMAGE_SIZE: i64 = 28;
/// Zero padding on every side that turns 28x28 into LeNet-5's 32x32 input.
pub const PAD: i64 = (INPUT_SIZE - IMAGE_SIZE) / 2;
/// An IDX file is never larger than this once decompressed (MNIST's largest is 47 MB), so a
/// gzip bomb or a corrupt header cannot make us allocate without bound.
const MAX_IDX_BYTES: u64 = 512 << 20;

const IMAGES_MAGIC: u32 = 0x0000_0803; // unsigned bytes, 3 dimensions
const LABELS_MAGIC: u32 = 0x0000_0801; // unsigned bytes, 1 dimension

/// The data sets this program knows, with the statistics used to normalise them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Mnist,
    FashionMnist,
}

crate::named_values!(DatasetKind { Mnist => "mnist", FashionMnist => "fashion-mnist" });

impl DatasetKind {
    /// Mean and standard deviation of the training pixels scaled to [0, 1].
    pub fn normalization(self) -> Normalization {
        match self {
            DatasetKind::Mnist => Normalization { mean: 0.1307, std: 0.3081 },
            DatasetKind::FashionMnist => Normalization { mean: 0.2860, std: 0.3530 },
        }
    }

    pub fn class_names(self) -> Vec<String> {
        let names: &[&str] = match self {
            DatasetKind::Mnist => &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            DatasetKind::FashionMnist => &[
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ],
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The folders searched, in order, unless `--data` says otherwise: the project's own
    /// (scripts/setup fills it), then, for Fashion-MNIST, where Debian's package installs it.
    pub fn default_dirs(self) -> &'static [&'static str] {
        match self {
            DatasetKind::Mnist => &["data/mnist"],
            DatasetKind::FashionMnist => &["data/fashion-mnist", "/usr/share/datasets/fashion-mnist"],
        }
    }

    /// The first of [`Self::default_dirs`] that exists, else the first (for the error message).
    pub fn default_dir(self) -> PathBuf {
        let dirs = self.default_dirs();
        PathBuf::from(dirs.iter().find(|d| Path::new(d).is_dir()).unwrap_or(&dirs[0]))
    }

    /// The command that puts the data in its default folder.
    pub fn fetch_hint(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "scripts/setup (or scripts/fetch-data mnist) fetches it",
            DatasetKind::FashionMnist => "scripts/setup (or scripts/fetch-data fashion-mnist, on Debian) fetches it",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: f64,
    pub std: f64,
}

impl Normalization {
    /// What a blank (black) pixel becomes: the fill for padding and shifts.
    pub fn background(&self) -> f64 {
        -self.mean / self.std
    }
}

/// Images and labels of one split, resident on one device.
#[derive(Debug)]
pub struct Dataset {
    /// `(N, 1, 32, 32)` float, zero-padded by 2 then normalised.
    pub images: Tensor,
    /// `(N,)` int64 class indices.
    pub labels: Tensor,
}

impl Dataset {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` examples (all of them if there are fewer), sharing storage.
    pub fn take(&self, n: i64) -> Dataset {
        let n = n.min(self.len());
        Dataset { images: self.images.narrow(0, 0, n), labels: self.labels.narrow(0, 0, n) }
    }

    pub fn to_device(&self, device: Device) -> Dataset {
        Dataset { images: self.images.to_device(device), labels: self.labels.to_device(device) }
    }
}

/// The training and test splits of a data set.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

impl Splits {
    pub fn to_device(&self, device: Device) -> Splits {
        Splits { train: self.train.to_device(device), test: self.test.to_device(device) }
    }
}

/// A parsed IDX file: its dimensions and its raw bytes.
#[derive(Debug, PartialEq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses IDX bytes, checking the magic number against `expected_magic` and the length
/// against the header. `name` is only used in error messages.
pub fn parse_idx(bytes: &[u8], expected_magic: u32, name: &str) -> Result<Idx> {
    ensure!(!bytes.is_empty(), "{name}: the file is empty");
    ensure!(bytes.len() >= 4, "{name}: truncated: {} bytes, too short for an IDX header", bytes.len());
    let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != expected_magic {
        bail!(
            "{name}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} \
             (is this an IDX {} file?)",
            if expected_magic == IMAGES_MAGIC { "image" } else { "label" }
        );
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    ensure!(bytes.len() >= header, "{name}: truncated inside its header ({} bytes)", bytes.len());
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let expected = match expected {
        Some(n) if n as u64 <= MAX_IDX_BYTES => n,
        _ => bail!("{name}: header declares dimensions {dims:?}, more data than any IDX file holds"),
    };
    let body = &bytes[header..];
    ensure!(
        body.len() >= expected,
        "{name}: truncated: header {dims:?} needs {expected} bytes of data, the file has {}",
        body.len()
    );
    ensure!(
        body.len() == expected,
        "{name}: {} bytes of trailing garbage after the {expected} bytes its header {dims:?} declares",
        body.len() - expected
    );
    Ok(Idx { dims, data: body.to_vec() })
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut raw = Vec::new();
    file.take(MAX_IDX_BYTES + 1).read_to_end(&mut raw).with_context(|| format!("{}: cannot read", path.display()))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("{}: corrupt gzip data", path.display()))?;
    Ok(out)
}

/// Finds `stem` or `stem.gz` in `dir`.
fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let plain = dir.join(stem);
    let gz = dir.join(format!("{stem}.gz"));
    if plain.is_file() {
        Ok(plain)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        bail!("{}: missing {stem} (or {stem}.gz)", dir.display())
    }
}

/// Reads one split (`prefix` is `train` or `t10k`) from `dir` into CPU tensors.
pub fn load_split(dir: &Path, prefix: &str, norm: Normalization) -> Result<Dataset> {
    let images_path = find_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images_name = images_path.display().to_string();
    let labels_name = labels_path.display().to_string();
    let images = parse_idx(&read_maybe_gzip(&images_path)?, IMAGES_MAGIC, &images_name)?;
    let labels = parse_idx(&read_maybe_gzip(&labels_path)?, LABELS_MAGIC, &labels_name)?;

    let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    ensure!(
        rows as i64 == IMAGE_SIZE && cols as i64 == IMAGE_SIZE,
        "{images_name}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
    );
    ensure!(n > 0, "{images_name}: holds no images");
    ensure!(labels.dims[0] == n, "{labels_name}: {} labels for the {n} images in {images_name}", labels.dims[0]);
    if let Some((i, &label)) = labels.data.iter().enumerate().find(|(_, &l)| l > 9) {
        bail!("{labels_name}: label {label} at index {i} is out of range 0..=9");
    }
    Ok(to_tensors(&images.data, &labels.data, norm))
}

/// Raw 28x28 bytes and labels -> padded, normalised tensors.
pub fn to_tensors(pixels: &[u8], labels: &[u8], norm: Normalization) -> Dataset {
    let n = labels.len() as i64;
    let raw = Tensor::from_slice(pixels).view([n, 1, IMAGE_SIZE, IMAGE_SIZE]); // (N, 1, 28, 28) u8
                                                                               // One statement, so each float copy of the 60,000 images is freed as soon as it is used:
                                                                               // the training set is 245 MB at 32x32, and the loading's peak sets the process's.
    let padded = (raw.to_kind(Kind::Float) / 255.0).constant_pad_nd([PAD, PAD, PAD, PAD]); // (N, 1, 32, 32)
    Dataset { images: normalize_in_place(padded, norm), labels: Tensor::from_slice(labels).to_kind(Kind::Int64) }
}

/// `(x - mean) / std`, elementwise, on pixels already scaled to [0, 1].
pub fn normalize(xs: &Tensor, norm: Normalization) -> Tensor {
    normalize_in_place(xs.copy(), norm)
}

/// [`normalize`] in `xs`'s own memory (the same two roundings).
fn normalize_in_place(mut xs: Tensor, norm: Normalization) -> Tensor {
    let _ = xs.g_sub_scalar_(norm.mean).g_div_scalar_(norm.std);
    xs
}

/// The data folder of `kind`: `dir`, or its default folder when `None`. It must exist.
fn data_dir(kind: DatasetKind, dir: Option<&Path>) -> Result<PathBuf> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| kind.default_dir());
    if !dir.is_dir() {
        bail!("data folder {} does not exist; {}", dir.display(), kind.fetch_hint());
    }
    Ok(dir)
}

/// Loads both splits of `kind` from `dir` (its default folder when `None`).
pub fn load(kind: DatasetKind, dir: Option<&Path>) -> Result<Splits> {
    let dir = data_dir(kind, dir)?;
    let norm = kind.normalization();
    Ok(Splits { train: load_split(&dir, "train", norm)?, test: load_split(&dir, "t10k", norm)? })
}

/// Loads only the test split (for evaluation, export and pictures), normalised with `norm`
/// (usually `kind.normalization()`).
pub fn load_test(kind: DatasetKind, dir: Option<&Path>, norm: Normalization) -> Result<Dataset> {
    load_split(&data_dir(kind, dir)?, "t10k", norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn parses_a_valid_file() {
        let bytes = idx(IMAGES_MAGIC, &[2, 1, 3], &[1, 2, 3, 4, 5, 6]);
        let got = parse_idx(&bytes, IMAGES_MAGIC, "x").unwrap();
        assert_eq!(got, Idx { dims: vec![2, 1, 3], data: vec![1, 2, 3, 4, 5, 6] });
    }

    #[test]
    fn rejects_broken_files_with_the_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![0, 0, 8], "too short"),
            (idx(LABELS_MAGIC, &[2], &[1, 2]), "wrong magic number 0x00000801"),
            (idx(IMAGES_MAGIC, &[2, 1], &[]), "truncated inside its header"),
            (idx(IMAGES_MAGIC, &[2, 1, 3], &[1, 2, 3]), "truncated: header [2, 1, 3] needs 6 bytes"),
            (idx(IMAGES_MAGIC, &[1, 1, 1], &[1, 2]), "trailing garbage"),
            (idx(IMAGES_MAGIC, &[u32::MAX, u32::MAX, 2], &[]), "more data than any IDX file"),
        ];
        for (bytes, reason) in cases {
            let err = parse_idx(&bytes, IMAGES_MAGIC, "some-file").unwrap_err().to_string();
            assert!(err.starts_with("some-file: "), "{err}");
            assert!(err.contains(reason), "expected {reason:?} in {err:?}");
        }
    }

    #[test]
    fn pads_by_two_with_background_and_normalises() {
        let norm = Normalization { mean: 0.5, std: 0.25 };
        let mut pixels = vec![0u8; 28 * 28];
        pixels[0] = 255; // top-left pixel of the 28x28 image
        let d = to_tensors(&pixels, &[7], norm);
        assert_eq!(d.images.size(), [1, 1, 32, 32]);
        let at = |y, x| d.images.double_value(&[0, 0, y, x]);
        assert_eq!(at(2, 2), (1.0 - 0.5) / 0.25); // moved by the 2-pixel pad
        assert_eq!(at(0, 0), (0.0 - 0.5) / 0.25); // padding is black before normalising
        assert_eq!(at(2, 3), (0.0 - 0.5) / 0.25);
        assert_eq!(d.labels.int64_value(&[0]), 7);
    }
}
