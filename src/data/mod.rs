//! MNIST-style data: the IDX file format (plain or gzip'd), checked strictly and read as a
//! stream, and the data set held as its bytes, padded and normalised to LeNet-5's `(B, 1, 32,
//! 32)` inputs as batches are taken. Python's twin: `load_idx` in `scripts/lenet5_ref.py`.

pub mod handwriting;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::model::INPUT_SIZE;
use crate::values;

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

/// What a data set's images are held as.
#[derive(Debug)]
pub enum Images {
    /// The IDX files' bytes `(N, 1, 28, 28)` u8, padded and normalised with this normalisation
    /// as they are taken ([`to_inputs`]): a sixth of the memory of the float inputs.
    Bytes(Tensor, Normalization),
    /// Network inputs `(N, 1, 32, 32)` float, taken as they are (the binding's caller's own).
    Inputs(Tensor),
}

impl Images {
    /// The network inputs of the examples `pick` takes from the held tensor.
    fn inputs(&self, pick: impl Fn(&Tensor) -> Tensor) -> Tensor {
        match self {
            Images::Bytes(bytes, norm) => to_inputs(&pick(bytes), *norm),
            Images::Inputs(inputs) => pick(inputs),
        }
    }

    /// The same kind of images, `f` applied to the held tensor.
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Images {
        match self {
            Images::Bytes(bytes, norm) => Images::Bytes(f(bytes), *norm),
            Images::Inputs(inputs) => Images::Inputs(f(inputs)),
        }
    }

    /// The held tensor: bytes or inputs.
    pub fn held(&self) -> &Tensor {
        match self {
            Images::Bytes(t, _) | Images::Inputs(t) => t,
        }
    }
}

/// Images and labels of one split, resident on one device.
#[derive(Debug)]
pub struct Dataset {
    pub images: Images,
    /// `(N,)` int64 class indices.
    pub labels: Tensor,
}

impl Dataset {
    /// A data set of ready network inputs `(N, 1, 32, 32)` float and their labels.
    pub fn of_inputs(inputs: Tensor, labels: Tensor) -> Dataset {
        Dataset { images: Images::Inputs(inputs), labels }
    }

    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> Device {
        self.labels.device()
    }

    /// The network inputs `(B, 1, 32, 32)` of the examples at `rows` `(B,)` int64.
    pub fn inputs(&self, rows: &Tensor) -> Tensor {
        self.images.inputs(|t| t.index_select(0, rows))
    }

    /// The network inputs `(len, 1, 32, 32)` of examples `start..start + len`.
    pub fn inputs_range(&self, start: i64, len: i64) -> Tensor {
        self.images.inputs(|t| t.narrow(0, start, len))
    }

    /// Every example's network input `(N, 1, 32, 32)`.
    pub fn all_inputs(&self) -> Tensor {
        self.inputs_range(0, self.len())
    }

    /// The first `n` examples (all of them if there are fewer), sharing storage.
    pub fn take(&self, n: i64) -> Dataset {
        let n = n.min(self.len());
        Dataset { images: self.images.map(|t| t.narrow(0, 0, n)), labels: self.labels.narrow(0, 0, n) }
    }

    pub fn to_device(&self, device: Device) -> Dataset {
        Dataset { images: self.images.map(|t| t.to_device(device)), labels: self.labels.to_device(device) }
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
    IdxStream { reader: Box::new(bytes), name: name.to_string(), failure: "cannot read" }.read_all(expected_magic)
}

/// Bytes handed on a chunk at a time while an IDX body streams into its tensor: large, since
/// each chunk is one libtorch copy (whose OpenMP team costs milliseconds to wake on a busy machine).
const CHUNK: usize = 4 << 20;

/// An IDX file as a stream of bytes, read front to back: the header, then the body in chunks,
/// so a data set goes straight into its tensor without a whole copy of the file in between.
pub struct IdxStream<'a> {
    reader: Box<dyn Read + 'a>,
    /// The file, in messages.
    name: String,
    /// What a failed read means: "corrupt gzip data" for a gzip'd file.
    failure: &'static str,
}

impl IdxStream<'_> {
    /// `path`, gunzipped when it starts with the gzip magic bytes.
    pub fn open(path: &Path) -> Result<IdxStream<'static>> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open"))?;
        let mut file = BufReader::new(file);
        let gzip = file.fill_buf().with_context(|| format!("{name}: cannot read"))?.starts_with(&[0x1f, 0x8b]);
        Ok(if gzip {
            IdxStream {
                reader: Box::new(flate2::bufread::MultiGzDecoder::new(file)),
                name,
                failure: "corrupt gzip data",
            }
        } else {
            IdxStream { reader: Box::new(file), name, failure: "cannot read" }
        })
    }

    /// Up to `n` bytes into `buf` (cleared first), fewer only at the end of the file.
    fn read_up_to(&mut self, n: usize, buf: &mut Vec<u8>) -> Result<usize> {
        buf.clear();
        (&mut self.reader).take(n as u64).read_to_end(buf).with_context(|| format!("{}: {}", self.name, self.failure))
    }

    /// The header's dimensions, its magic number checked against `expected_magic` and the
    /// data it declares against the size of any IDX file.
    pub fn header(&mut self, expected_magic: u32) -> Result<Vec<usize>> {
        let name = self.name.clone();
        let mut head = Vec::with_capacity(4);
        let got = self.read_up_to(4, &mut head)?;
        ensure!(got > 0, "{name}: the file is empty");
        ensure!(got == 4, "{name}: truncated: {got} bytes, too short for an IDX header");
        let magic = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        if magic != expected_magic {
            bail!(
                "{name}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} \
                 (is this an IDX {} file?)",
                if expected_magic == IMAGES_MAGIC { "image" } else { "label" }
            );
        }
        let ndims = (magic & 0xff) as usize;
        let got = self.read_up_to(4 * ndims, &mut head)?;
        ensure!(got == 4 * ndims, "{name}: truncated inside its header ({} bytes)", 4 + got);
        let dims: Vec<usize> =
            head.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize).collect();
        match dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) {
            Some(n) if n as u64 <= MAX_IDX_BYTES => Ok(dims),
            _ => bail!("{name}: header declares dimensions {dims:?}, more data than any IDX file holds"),
        }
    }

    /// The body that `dims` (from [`Self::header`]) declare, handed to `sink` a chunk at a
    /// time in order; then checks that the file ends there.
    pub fn body(&mut self, dims: &[usize], mut sink: impl FnMut(&[u8])) -> Result<()> {
        let name = self.name.clone();
        let expected: usize = dims.iter().product();
        let mut chunk = Vec::with_capacity(CHUNK.min(expected));
        let mut seen = 0;
        while seen < expected {
            let got = self.read_up_to(CHUNK.min(expected - seen), &mut chunk)?;
            ensure!(got > 0, "{name}: truncated: header {dims:?} needs {expected} bytes of data, the file has {seen}");
            sink(&chunk);
            seen += got;
        }
        let trailing = std::io::copy(&mut (&mut self.reader).take(MAX_IDX_BYTES), &mut std::io::sink())
            .with_context(|| format!("{name}: {}", self.failure))?;
        ensure!(
            trailing == 0,
            "{name}: {trailing} bytes of trailing garbage after the {expected} bytes its header {dims:?} declares"
        );
        Ok(())
    }

    /// The whole file: its header and its body.
    pub fn read_all(mut self, expected_magic: u32) -> Result<Idx> {
        let dims = self.header(expected_magic)?;
        let mut data = Vec::with_capacity(dims.iter().product());
        self.body(&dims, |chunk| data.extend_from_slice(chunk))?;
        Ok(Idx { dims, data })
    }
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let mut stream = IdxStream::open(path)?;
    let mut out = Vec::new();
    stream.read_up_to(MAX_IDX_BYTES as usize + 1, &mut out)?;
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

/// Reads one split (`prefix` is `train` or `t10k`) from `dir` into CPU tensors: the images as
/// their bytes, streamed into their tensor (to be normalised with `norm` as they are taken).
pub fn load_split(dir: &Path, prefix: &str, norm: Normalization) -> Result<Dataset> {
    let images_path = find_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images_name = images_path.display().to_string();
    let labels_name = labels_path.display().to_string();
    let mut images = IdxStream::open(&images_path)?;
    let dims = images.header(IMAGES_MAGIC)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    ensure!(
        rows as i64 == IMAGE_SIZE && cols as i64 == IMAGE_SIZE,
        "{images_name}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
    );
    ensure!(n > 0, "{images_name}: holds no images");
    let labels = IdxStream::open(&labels_path)?.read_all(LABELS_MAGIC)?;
    ensure!(labels.dims[0] == n, "{labels_name}: {} labels for the {n} images in {images_name}", labels.dims[0]);
    if let Some((i, &label)) = labels.data.iter().enumerate().find(|(_, &l)| l > 9) {
        bail!("{labels_name}: label {label} at index {i} is out of range 0..=9");
    }
    let mut bytes = Tensor::empty([(n * rows * cols) as i64], (Kind::Uint8, Device::Cpu)); // every byte written next
    let mut rest = values::of_mut::<u8>(&mut bytes);
    images.body(&dims, |chunk| {
        let (to, tail) = std::mem::take(&mut rest).split_at_mut(chunk.len());
        to.copy_from_slice(chunk);
        rest = tail;
    })?;
    Ok(Dataset {
        images: Images::Bytes(bytes.view([n as i64, 1, IMAGE_SIZE, IMAGE_SIZE]), norm),
        labels: Tensor::from_slice(&labels.data).to_kind(Kind::Int64),
    })
}

/// Bytes `(B, 1, 28, 28)` -> network inputs `(B, 1, 32, 32)` float32: scaled to [0, 1],
/// zero-padded by [`PAD`], then normalised, each step rounding as it always has (the data set
/// was once held as these floats; a test checks the bits are the same).
pub fn to_inputs(bytes: &Tensor, norm: Normalization) -> Tensor {
    let images = bytes.size().ends_with(&[1, IMAGE_SIZE, IMAGE_SIZE]);
    if images && bytes.device() == Device::Cpu && bytes.kind() == Kind::Uint8 {
        return to_inputs_by_table(&bytes.contiguous(), norm);
    }
    let padded = (bytes.to_kind(Kind::Float) / 255.0).constant_pad_nd([PAD, PAD, PAD, PAD]); // (B, 1, 32, 32)
    normalize_in_place(padded, norm)
}

/// [`to_inputs`] on the CPU in one pass: each byte looks its float up in a table of the 256
/// that the same libtorch ops give (the padding's is byte 0's), instead of six ops' passes.
fn to_inputs_by_table(bytes: &Tensor, norm: Normalization) -> Tensor {
    let table = normalize_in_place(Tensor::arange(256, (Kind::Float, Device::Cpu)) / 255.0, norm);
    let table = values::of::<f32>(&table);
    let (side, image) = (INPUT_SIZE as usize, IMAGE_SIZE as usize);
    let images = bytes.numel() / (image * image);
    let mut inputs = Tensor::empty([images as i64, 1, INPUT_SIZE, INPUT_SIZE], (Kind::Float, Device::Cpu));
    let pixels = values::of::<u8>(bytes).chunks_exact(image * image);
    for (input, pixels) in values::of_mut::<f32>(&mut inputs).chunks_exact_mut(side * side).zip(pixels) {
        input.fill(table[0]);
        for (line, row) in input.chunks_exact_mut(side).skip(PAD as usize).zip(pixels.chunks_exact(image)) {
            for (x, &byte) in line[PAD as usize..].iter_mut().zip(row) {
                *x = table[byte as usize];
            }
        }
    }
    inputs
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
        let inputs = to_inputs(&Tensor::from_slice(&pixels).view([1, 1, 28, 28]), norm);
        assert_eq!(inputs.size(), [1, 1, 32, 32]);
        let at = |y, x| inputs.double_value(&[0, 0, y, x]);
        assert_eq!(at(2, 2), (1.0 - 0.5) / 0.25); // moved by the 2-pixel pad
        assert_eq!(at(0, 0), (0.0 - 0.5) / 0.25); // padding is black before normalising
        assert_eq!(at(2, 3), (0.0 - 0.5) / 0.25);
    }
}
