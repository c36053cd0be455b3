//! Your own handwriting as LeNet-5 input: an image file (PNG, JPEG, BMP, PGM) made into the
//! normalised 32x32 tensor the network trained on, the way MNIST's digits were made.
//!
//! MNIST's recipe (LeCun et al.): the ink's bounding box scaled to fit 20x20 keeping the aspect
//! ratio (anti-aliased, hence gray levels), then placed in 28x28 with its centre of mass at the
//! centre. LeNet-5 adds 2 pixels of padding (32x32) and the data set's normalisation.

use anyhow::{bail, ensure, Context, Result};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, ImageReader, Luma};
use std::path::Path;
use tch::{Kind, Tensor};

use crate::data::{Normalization, IMAGE_SIZE, PAD};
use crate::model::INPUT_SIZE;

/// Longest side of an image this program decodes; larger ones are refused from their header,
/// before any pixel is decoded.
pub const MAX_SIDE: u32 = 12_000;
/// Most memory the decoder may allocate for one image.
const MAX_DECODE_BYTES: u64 = 512 << 20;
/// The side of the box the ink is scaled to fit, as in MNIST.
pub const BOX: u32 = 20;
/// Where MNIST puts the centre of mass, in pixel indices of the 28x28 image (measured on the
/// test set: 13.99 rows, 14.01 columns on average).
pub const CENTRE: f32 = 14.0;
/// A border this light (0 black .. 1 white) means dark ink on light paper: the image is inverted.
const LIGHT_BACKGROUND: f32 = 0.5;
/// Less difference than this between the background and the strongest ink: a blank image.
const MIN_CONTRAST: f32 = 0.1;
/// Shades closer than this to the background (as a fraction of the way to the strongest ink)
/// are paper and become 0, as MNIST's background is; the rest is stretched to 0..=1.
const NOISE_FLOOR: f32 = 0.15;
/// After that, pixels at least this bright are ink, and their bounding box is what gets scaled.
/// On MNIST's own digits the box is then the same 20 pixels as with any level above 0 (99% of
/// the test set), while the grain of paper and JPEG stays below it.
const INK_THRESHOLD: f32 = 0.35;

/// A grayscale image, row-major, values in 0..=1 (0 black, 1 white).
#[derive(Debug, Clone, PartialEq)]
pub struct Gray {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<f32>,
}

impl Gray {
    pub fn from_fn(width: u32, height: u32, f: impl Fn(u32, u32) -> f32) -> Gray {
        Gray {
            width,
            height,
            pixels: (0..height).flat_map(|y| (0..width).map(move |x| (x, y))).map(|(x, y)| f(x, y)).collect(),
        }
    }

    /// The median of the outermost ring of pixels: the paper's shade.
    fn border_median(&self) -> f32 {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut ring: Vec<f32> = self.pixels[..w].to_vec();
        ring.extend_from_slice(&self.pixels[(h - 1) * w..]);
        ring.extend(self.pixels.chunks(w).flat_map(|row| [row[0], row[w - 1]]));
        ring.sort_by(f32::total_cmp);
        ring[ring.len() / 2]
    }
}

/// An image file after MNIST-style preprocessing.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// 28x28 ink in 0..=1, white on black, row-major: what an MNIST file would hold.
    pub digit: Vec<f32>,
    /// The image had a light background and was inverted.
    pub inverted: bool,
    /// The ink's bounding box in the source image: x, y, width, height.
    pub ink_box: (u32, u32, u32, u32),
    /// Width and height of the source image.
    pub source_size: (u32, u32),
}

impl Prepared {
    /// The 32x32 image in 0..=1 (the 28x28 digit padded by 2): what the network sees, before
    /// normalisation.
    pub fn padded(&self) -> Vec<f32> {
        let (side, pad, inner) = (INPUT_SIZE as usize, PAD as usize, IMAGE_SIZE as usize);
        let mut out = vec![0.0; side * side];
        for (r, row) in self.digit.chunks(inner).enumerate() {
            out[(r + pad) * side + pad..(r + pad) * side + pad + inner].copy_from_slice(row);
        }
        out
    }

    /// The network input `(1, 1, 32, 32)`, normalised with `norm`.
    pub fn tensor(&self, norm: Normalization) -> Tensor {
        input_tensor(&self.padded(), norm)
    }

    /// The padded 32x32 image as an 8-bit grayscale PNG (value * 255, rounded).
    pub fn png(&self) -> Result<Vec<u8>> {
        use image::ImageEncoder;
        let bytes: Vec<u8> = self.padded().iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
        let mut png = Vec::new();
        let side = INPUT_SIZE as u32;
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&bytes, side, side, image::ExtendedColorType::L8)
            .context("encoding the preprocessed image")?;
        Ok(png)
    }
}

/// A 32x32 image in 0..=1 (row-major, like [`Prepared::padded`]) as the network input
/// `(1, 1, 32, 32)`, normalised with `norm`.
pub fn input_tensor(padded: &[f32], norm: Normalization) -> Tensor {
    let xs = Tensor::from_slice(padded).to_kind(Kind::Float).view([1, 1, INPUT_SIZE, INPUT_SIZE]);
    crate::data::normalize(&xs, norm)
}

/// Decodes an image file (format recognised by its content, not its name) to grayscale,
/// transparent parts counted as white paper. Refuses absurd sizes before decoding.
pub fn read_gray(path: &Path) -> Result<Gray> {
    let name = path.display().to_string();
    let len = std::fs::metadata(path).with_context(|| format!("{name}: cannot open"))?.len();
    ensure!(len > 0, "{name}: the file is empty");
    let file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open"))?;
    decode_gray(std::io::BufReader::new(file), &name)
}

/// [`read_gray`] on an image already in memory (an upload); `name` is for error messages.
pub fn decode_gray_bytes(bytes: &[u8], name: &str) -> Result<Gray> {
    ensure!(!bytes.is_empty(), "{name}: empty (no image)");
    decode_gray(std::io::Cursor::new(bytes), name)
}

/// The decoding behind [`read_gray`] and [`decode_gray_bytes`]: the format from the first bytes,
/// the size checked from the header before any pixel is decoded.
fn decode_gray<R: std::io::BufRead + std::io::Seek>(source: R, name: &str) -> Result<Gray> {
    // ImageReader::open would take the format from the file name; only the content counts.
    let mut reader = ImageReader::new(source).with_guessed_format().with_context(|| format!("{name}: cannot read"))?;
    let Some(format) = reader.format() else {
        let mut source = reader.into_inner();
        let mut head = [0u8; 4];
        // Only for the message: bytes that cannot be re-read are left out of it.
        let n =
            std::io::Seek::rewind(&mut source).and_then(|()| std::io::Read::read(&mut source, &mut head)).unwrap_or(0);
        bail!(
            "{name}: not an image this program reads (PNG, JPEG, BMP or PGM/PPM/PBM); it starts with bytes {:02x?}",
            &head[..n]
        );
    };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            anyhow::anyhow!("{name}: the {format:?} image is too large to read (at most {MAX_SIDE}x{MAX_SIDE} pixels and {} MiB decoded)", MAX_DECODE_BYTES >> 20)
        }
        e => anyhow::anyhow!("{name}: cannot decode the {format:?} image ({e})"),
    })?;
    ensure!(
        image.width() > 0 && image.height() > 0,
        "{name}: the image has no pixels ({}x{})",
        image.width(),
        image.height()
    );
    let (width, height) = (image.width(), image.height());
    let pixels = match image {
        DynamicImage::ImageLuma8(g) => g.as_raw().iter().map(|&v| v as f32 / 255.0).collect(),
        other => other.to_luma_alpha32f().as_raw().chunks_exact(2).map(|la| la[0] * la[1] + (1.0 - la[1])).collect(), // over white paper
    };
    Ok(Gray { width, height, pixels })
}

/// MNIST-style preprocessing of a grayscale image; `name` is for error messages.
pub fn prepare(g: &Gray, name: &str) -> Result<Prepared> {
    let (w, h) = (g.width, g.height);
    // 1. White ink on black: invert dark-on-light images.
    let border = g.border_median();
    let inverted = border > LIGHT_BACKGROUND;
    let mut ink = g.clone();
    if inverted {
        ink.pixels.iter_mut().for_each(|v| *v = 1.0 - *v);
    }
    // 2. The paper (and its grain) to 0 and the strongest ink to 1.
    let background = if inverted { ink.border_median() } else { border };
    let peak = ink.pixels.iter().copied().fold(0.0f32, f32::max);
    ensure!(
        peak - background >= MIN_CONTRAST,
        "{name}: the image is blank: no ink stands out from the {} background",
        if inverted { "light" } else { "dark" }
    );
    let floor = background + NOISE_FLOOR * (peak - background);
    ink.pixels.iter_mut().for_each(|v| *v = ((*v - floor) / (peak - floor)).clamp(0.0, 1.0));
    // 3. Crop to the ink's bounding box.
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (y, row) in ink.pixels.chunks(w as usize).enumerate() {
        if let (Some(first), Some(last)) =
            (row.iter().position(|&v| v >= INK_THRESHOLD), row.iter().rposition(|&v| v >= INK_THRESHOLD))
        {
            (x0, x1) = (x0.min(first as u32), x1.max(last as u32));
            (y0, y1) = (y0.min(y as u32), y1.max(y as u32));
        }
    }
    let (bw, bh) = (x1 + 1 - x0, y1 + 1 - y0); // the peak pixel is ink, so the box is not empty
    let cropped: Vec<f32> = ink
        .pixels
        .chunks(w as usize)
        .skip(y0 as usize)
        .take(bh as usize)
        .flat_map(|row| &row[x0 as usize..(x0 + bw) as usize])
        .copied()
        .collect();
    let cropped =
        ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(bw, bh, cropped).context("the crop holds bw * bh pixels")?;
    // 4. Scale to fit 20x20, keeping the aspect ratio; stretch so the strongest ink is 1 again.
    let scale = BOX as f32 / bw.max(bh) as f32;
    let (sw, sh) =
        (((bw as f32 * scale).round() as u32).clamp(1, BOX), ((bh as f32 * scale).round() as u32).clamp(1, BOX));
    let mut boxed = imageops::resize(&cropped, sw, sh, FilterType::Triangle).into_raw(); // (sh, sw)
    let top = boxed.iter().copied().fold(0.0f32, f32::max);
    if top > 0.0 {
        boxed.iter_mut().for_each(|v| *v = (*v / top).clamp(0.0, 1.0));
    }
    // 5. Into 28x28 with the centre of mass at the centre (kept whole inside the frame).
    let (mut mass, mut my, mut mx) = (0.0f32, 0.0f32, 0.0f32);
    for (k, &v) in boxed.iter().enumerate() {
        mass += v;
        my += (k as u32 / sw) as f32 * v;
        mx += (k as u32 % sw) as f32 * v;
    }
    let side = IMAGE_SIZE as usize;
    let (cy, cx) = if mass > 0.0 { (my / mass, mx / mass) } else { (sh as f32 / 2.0, sw as f32 / 2.0) };
    let oy = ((CENTRE - cy).round() as i64).clamp(0, side as i64 - sh as i64) as usize;
    let ox = ((CENTRE - cx).round() as i64).clamp(0, side as i64 - sw as i64) as usize;
    let mut digit = vec![0.0f32; side * side];
    for (y, row) in boxed.chunks(sw as usize).enumerate() {
        digit[(oy + y) * side + ox..(oy + y) * side + ox + sw as usize].copy_from_slice(row);
    }
    Ok(Prepared { digit, inverted, ink_box: (x0, y0, bw, bh), source_size: (w, h) })
}

/// Reads and preprocesses an image file.
pub fn load(path: &Path) -> Result<Prepared> {
    prepare(&read_gray(path)?, &path.display().to_string())
}

/// Preprocesses an image file already in memory (an upload); `name` is for error messages.
pub fn load_bytes(bytes: &[u8], name: &str) -> Result<Prepared> {
    prepare(&decode_gray_bytes(bytes, name)?, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> f32) -> Gray {
        Gray::from_fn(w, h, f)
    }

    #[test]
    fn a_dark_bar_on_white_becomes_a_centred_white_bar_20_high() {
        // A 6-wide, 40-high black bar on white paper, off to one side of a 100x60 image.
        let g = gray(100, 60, |x, y| if (70..76).contains(&x) && (10..50).contains(&y) { 0.0 } else { 1.0 });
        let p = prepare(&g, "bar").unwrap();
        assert!(p.inverted);
        assert_eq!(p.ink_box, (70, 10, 6, 40));
        let at = |y: usize, x: usize| p.digit[y * 28 + x];
        // 40 rows scale to 20, 6 columns to 3. The scaled box's centre of mass is at row 9.5,
        // column 1, so it moves round(14 - 9.5) = 5 rows down and 14 - 1 = 13 columns right.
        let lit: Vec<(usize, usize)> =
            (0..28).flat_map(|y| (0..28).map(move |x| (y, x))).filter(|&(y, x)| at(y, x) > 0.5).collect();
        let rows: Vec<usize> = lit.iter().map(|p| p.0).collect();
        let cols: Vec<usize> = lit.iter().map(|p| p.1).collect();
        assert_eq!((*rows.iter().min().unwrap(), *rows.iter().max().unwrap()), (5, 24), "{lit:?}");
        assert_eq!((*cols.iter().min().unwrap(), *cols.iter().max().unwrap()), (13, 15), "{lit:?}");
        assert_eq!(p.padded().len(), 32 * 32);
        assert_eq!(p.padded()[(5 + 2) * 32 + 13 + 2], at(5, 13));
    }

    #[test]
    fn a_blank_image_is_refused() {
        let err = prepare(&gray(30, 30, |_, _| 0.97), "blank.png").unwrap_err().to_string();
        assert!(err.contains("blank.png: the image is blank"), "{err}");
    }

    #[test]
    fn normalisation_matches_the_data_set() {
        let p =
            prepare(&gray(28, 28, |x, y| if (10..18).contains(&x) && (4..24).contains(&y) { 1.0 } else { 0.0 }), "x")
                .unwrap();
        let norm = Normalization { mean: 0.1307, std: 0.3081 };
        let t = p.tensor(norm);
        assert_eq!(t.size(), [1, 1, 32, 32]);
        assert!((t.double_value(&[0, 0, 0, 0]) - (-0.1307 / 0.3081)).abs() < 1e-6);
        assert!((t.max().double_value(&[]) - (1.0 - 0.1307) / 0.3081).abs() < 1e-5);
    }
}
