//! The data set as held in memory: MNIST's bytes, normalised as batches are taken to exactly
//! the float32 inputs the whole set was once stored as. Needs MNIST in data/mnist (scripts/setup).

use lenet5::data::{self, DatasetKind, Images, Normalization, IMAGE_SIZE, PAD};
use std::path::Path;
use tch::{Kind, Tensor};

/// The split's raw pixels, 28x28 bytes an image, read apart from `load_split`.
fn raw_pixels(file: &str) -> Vec<u8> {
    let bytes =
        data::read_maybe_gzip(&Path::new("data/mnist").join(file)).expect("MNIST in data/mnist: run scripts/setup");
    data::parse_idx(&bytes, 0x0803, file).unwrap().data
}

/// One network input as the float32 tensors of the whole set were computed: the byte scaled
/// to [0, 1], then `(x - mean) / std`, each step one float32 rounding (PyTorch's scalar ops
/// round the double scalars to float32 first). Padding is a 0 byte.
fn input_of(byte: u8, norm: Normalization) -> f32 {
    ((byte as f32 / 255.0) - norm.mean as f32) / norm.std as f32
}

/// Every input of `pixels` `(N, 28, 28)` padded to `(N, 1, 32, 32)`, by plain loops.
fn inputs_by_hand(pixels: &[u8], norm: Normalization) -> Vec<u32> {
    let (side, pad) = (IMAGE_SIZE as usize, PAD as usize);
    let padded = side + 2 * pad;
    let mut out = Vec::with_capacity(pixels.len() / (side * side) * padded * padded);
    for image in pixels.chunks(side * side) {
        for y in 0..padded {
            for x in 0..padded {
                let inside = (pad..pad + side).contains(&y) && (pad..pad + side).contains(&x);
                let byte = if inside { image[(y - pad) * side + (x - pad)] } else { 0 };
                out.push(input_of(byte, norm).to_bits());
            }
        }
    }
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    Vec::<f32>::try_from(t.contiguous().view(-1)).unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn the_training_split_is_held_as_bytes_and_normalises_to_the_same_floats_bit_for_bit() {
    let norm = DatasetKind::Mnist.normalization();
    let train = data::load(DatasetKind::Mnist, None).expect("MNIST in data/mnist: run scripts/setup").train;
    let Images::Bytes(bytes, held_norm) = &train.images else { panic!("the training images are not held as bytes") };
    assert_eq!((bytes.kind(), bytes.size()), (Kind::Uint8, vec![60_000, 1, 28, 28]));
    assert_eq!(*held_norm, norm);

    let pixels = raw_pixels("train-images-idx3-ubyte");
    let all = train.all_inputs();
    assert_eq!((all.kind(), all.size()), (Kind::Float, vec![60_000, 1, 32, 32]));
    assert!(bits(&all) == inputs_by_hand(&pixels, norm), "the whole set differs from the float32 computation");

    // A shuffled batch, as training takes it, is the same rows of the whole, bit for bit.
    tch::manual_seed(7);
    let rows = Tensor::randperm(60_000, (Kind::Int64, tch::Device::Cpu)).narrow(0, 0, 128);
    assert!(bits(&train.inputs(&rows)) == bits(&all.index_select(0, &rows)));
    assert!(bits(&train.inputs_range(59_990, 10)) == bits(&all.narrow(0, 59_990, 10)));
}

#[test]
fn the_test_split_is_held_as_bytes_too() {
    let norm = DatasetKind::Mnist.normalization();
    let test = data::load_test(DatasetKind::Mnist, None, norm).expect("MNIST in data/mnist: run scripts/setup");
    assert_eq!(test.images.held().kind(), Kind::Uint8);
    assert!(bits(&test.all_inputs()) == inputs_by_hand(&raw_pixels("t10k-images-idx3-ubyte"), norm));
}
