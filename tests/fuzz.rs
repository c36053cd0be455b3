//! Property-based fuzzing of everything that reads outside input: the IDX parser, model
//! files of every format (detection, then loading) from arbitrary bytes and from mutations
//! of real files (a torch.save checkpoint among them), and image preprocessing (any grayscale picture, mutated PNG files). Each
//! must return Ok or a clean error; a panic or a libtorch crash fails.
//! Bounded for CI (cases below); raise them with PROPTEST_CASES=N for a longer hunt.

use lenet5::data::parse_idx;
use lenet5::formats::torch_pickle::Value;
use lenet5::inference::{LoadOptions, Model};
use lenet5::model::{Arch, Head, LeNet5, ModelConfig};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::nn::{Module, VarStore};
use tch::{CModule, Device, Kind, Tensor};

/// `default` cases, or PROPTEST_CASES when set (a longer hunt than CI's).
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    ProptestConfig::with_cases(n)
}

fn idx_file(dims: &[u32], fill: u8) -> Vec<u8> {
    let mut b = (0x0800u32 | dims.len() as u32).to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(std::iter::repeat_n(fill, dims.iter().product::<u32>() as usize));
    b
}

/// A mutation of `base`: overwritten bytes, then maybe a truncation or an insertion.
fn mutate(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    (
        prop::collection::vec((0..len, any::<u8>()), 1..8),
        prop::option::of(0..len),
        prop::option::of((0..len, prop::collection::vec(any::<u8>(), 1..16))),
    )
        .prop_map(move |(flips, cut, insert)| {
            let mut b = base.clone();
            for (at, byte) in flips {
                b[at] = byte;
            }
            if let Some((at, bytes)) = insert {
                b.splice(at..at, bytes);
            }
            if let Some(cut) = cut {
                b.truncate(cut);
            }
            b
        })
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn idx_parser_accepts_only_consistent_files(bytes in prop::collection::vec(any::<u8>(), 0..64), magic in prop::sample::select(vec![0x801u32, 0x803])) {
        match parse_idx(&bytes, magic, "f") {
            Ok(idx) => prop_assert_eq!(idx.data.len(), idx.dims.iter().product::<usize>()),
            Err(e) => prop_assert!(e.to_string().starts_with("f: ")),
        }
    }

    #[test]
    fn idx_parser_survives_mutated_files(bytes in mutate(idx_file(&[3, 4, 5], 7))) {
        match parse_idx(&bytes, 0x803, "f") {
            Ok(idx) => prop_assert_eq!(idx.data.len(), idx.dims.iter().product::<usize>()),
            Err(e) => prop_assert!(e.to_string().starts_with("f: ")),
        }
    }
}

/// Real model files of every format this program reads, written once.
fn samples() -> &'static Vec<(&'static str, Vec<u8>)> {
    static SAMPLES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let dir = scratch();
        let mut vs = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&vs.root(), ModelConfig { arch: Arch::Modern, head: Head::Softmax });
        vs.save(dir.join("m.safetensors")).unwrap();
        vs.save(dir.join("m.ot")).unwrap();
        vs.freeze();
        let example = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let traced =
            CModule::create_by_tracing("LeNet5", "forward", &[example], &mut |xs| vec![net.forward(&xs[0])]).unwrap();
        traced.save(dir.join("m.pt")).unwrap();
        // A checkpoint as torch.save lays it out, small so that most mutations hit the pickle
        // and the zip's records rather than tensor data.
        let conv1 = |k: &str| Value::Tensor(vs.variables()[k].shallow_clone());
        let model = Value::Dict(vec![
            (Value::Str("conv1.bias".into()), conv1("conv1.bias")),
            (Value::Str("conv1.weight".into()), conv1("conv1.weight")),
        ]);
        let checkpoint = Value::Dict(vec![
            (Value::Str("epoch".into()), Value::Int(3)),
            (Value::Str("model_state_dict".into()), model),
            (Value::Str("betas".into()), Value::Tuple(vec![Value::Float(0.9), Value::Float(0.999)])),
            (Value::Str("state".into()), Value::Dict(vec![(Value::Int(0), Value::Tensor(Tensor::from(3.0f32)))])),
        ]);
        lenet5::formats::torch_pickle::write(&dir.join("checkpoint.pt"), &checkpoint).unwrap();
        ["m.safetensors", "m.ot", "m.pt", "checkpoint.pt"]
            .into_iter()
            .map(|f| (f, std::fs::read(dir.join(f)).unwrap()))
            .collect()
    })
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lenet5-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Detects and loads `bytes` as a model file; any outcome but a panic or crash is fine,
/// and errors name the file.
fn load_bytes(bytes: &[u8], case: usize) -> Result<(), TestCaseError> {
    let path = scratch().join(format!("case-{case}.bin"));
    std::fs::write(&path, bytes).unwrap();
    let result = Model::load(&path, &LoadOptions::default(), Device::Cpu);
    if let Err(e) = &result {
        prop_assert!(
            format!("{e:#}").contains(path.to_str().unwrap()) || format!("{e:#}").contains("TorchScript"),
            "{e:#}"
        );
    }
    if let Ok(model) = result {
        // A file that loads must also run, or fail cleanly, on a real batch.
        let _ = model.forward(&Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu)));
    }
    let _ = std::fs::remove_file(Path::new(&path));
    Ok(())
}

proptest! {
    #![proptest_config(cases(150))]

    #[test]
    fn model_loading_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), prefix in prop::sample::select(vec![&b""[..], b"PK\x03\x04", b"\x10\x00\x00\x00\x00\x00\x00\x00{"])) {
        let mut b = prefix.to_vec();
        b.extend(bytes);
        load_bytes(&b, 0)?;
    }

    #[test]
    fn model_loading_survives_mutated_safetensors(case in 0usize..1 << 20, bytes in mutate(samples()[0].1.clone())) {
        load_bytes(&bytes, case)?;
    }
}

proptest! {
    // libtorch parses these two itself (zip + pickle + TorchScript); fewer, costlier cases.
    #![proptest_config(cases(60))]

    #[test]
    fn model_loading_survives_mutated_tch_archives(case in 0usize..1 << 20, bytes in mutate(samples()[1].1.clone())) {
        load_bytes(&bytes, case)?;
    }

    #[test]
    fn model_loading_survives_mutated_torchscript(case in 0usize..1 << 20, bytes in mutate(samples()[2].1.clone())) {
        load_bytes(&bytes, case)?;
    }
}

proptest! {
    // Our own reader (zip + pickle, nothing of libtorch's but the tensors): cheap cases.
    #![proptest_config(cases(300))]

    #[test]
    fn model_loading_survives_mutated_torch_save_checkpoints(case in 0usize..1 << 20, bytes in mutate(samples()[3].1.clone())) {
        load_bytes(&bytes, case)?;
    }

    /// A mutated file mostly fails the zip's CRC check; this mutates the pickle itself and
    /// re-zips it with a good CRC, so the unpickler sees every mutation.
    #[test]
    fn model_loading_survives_mutated_pickles(case in 0usize..1 << 20, pkl in mutate(entries_of(&samples()[3].1)[0].1.clone())) {
        let mut entries = entries_of(&samples()[3].1);
        entries[0].1 = pkl;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data) in entries {
            zip.start_file(name, zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
            std::io::Write::write_all(&mut zip, &data).unwrap();
        }
        load_bytes(&zip.finish().unwrap().into_inner(), case)?;
    }
}

/// The entries of a zip, in order (data.pkl first, as torch.save writes it).
fn entries_of(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut file = zip.by_index(i).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut data).unwrap();
            (file.name().unwrap().to_string(), data)
        })
        .collect()
}

/// A small PNG of a digit-like blob, the base that image mutations start from.
fn sample_png() -> Vec<u8> {
    let img = image::GrayImage::from_fn(24, 30, |x, y| {
        image::Luma([if (8..16).contains(&x) && (5..25).contains(&y) { 20 } else { 235 }])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn preprocessing_any_grayscale_image_yields_a_valid_digit_or_a_clean_error(
        (w, h, pixels) in (1u32..48, 1u32..48).prop_flat_map(|(w, h)| (Just(w), Just(h), prop::collection::vec(0.0f32..=1.0, (w * h) as usize)))
    ) {
        let gray = lenet5::data::handwriting::Gray { width: w, height: h, pixels };
        match lenet5::data::handwriting::prepare(&gray, "img") {
            Ok(p) => {
                prop_assert_eq!(p.digit.len(), 28 * 28);
                prop_assert!(p.digit.iter().all(|v| (0.0..=1.0).contains(v)), "pixels outside 0..=1");
            }
            Err(e) => prop_assert!(e.to_string().starts_with("img: "), "{e}"),
        }
    }

    #[test]
    fn image_files_survive_mutation(case in 0usize..1 << 20, bytes in mutate(sample_png())) {
        let path = scratch().join(format!("img-{case}.png"));
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = lenet5::data::handwriting::load(&path) {
            prop_assert!(format!("{e:#}").contains(path.to_str().unwrap()), "{e:#}");
        }
        let _ = std::fs::remove_file(&path);
    }
}
