//! `torch_pickle::read_state_dict` against files PyTorch itself writes: every tensor must equal
//! the safetensors copy Python writes beside it, and every bad file must give a one-line error.

mod support;

use lenet5::formats::torch_pickle::read_state_dict;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Writes every fixture into `sys.argv[1]`: `NAME.pt` by torch.save and, for the readable ones,
/// `NAME.safetensors` holding contiguous copies of the same tensors.
const FIXTURES: &str = r#"
import os, sys, zipfile
import torch
from safetensors.torch import save_file
sys.path.insert(0, "scripts")
from lenet5_ref import LeNet5

out = sys.argv[1]
torch.manual_seed(0)

class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)  # float32 weight and bias
        self.register_buffer("f64", torch.randn(2, 3, dtype=torch.float64))
        self.register_buffer("f16", torch.randn(4).half())
        self.register_buffer("bf16", torch.randn(2, 2).bfloat16())
        self.register_buffer("i64", torch.tensor([-(2**40), -1, 0, 7]))
        self.register_buffer("flags", torch.tensor([[True, False], [False, True]]))
        self.register_buffer("scalar", torch.tensor(2.5))
        self.register_buffer("transposed", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous
        base = torch.randn(20)
        self.register_buffer("head", base[2:8].view(2, 3))  # two views of one storage,
        self.register_buffer("tail", base[10:])              # at different offsets

sd = Mixed().state_dict()
assert not sd["transposed"].is_contiguous()
assert sd["head"].untyped_storage().data_ptr() == sd["tail"].untyped_storage().data_ptr()
plain = dict(sd)
plain["param"] = torch.nn.Parameter(torch.randn(3))

def save(name, obj, **kwargs):
    torch.save(obj, f"{out}/{name}.pt", **kwargs)
    save_file({k: v.detach().contiguous().clone() for k, v in obj.items()}, f"{out}/{name}.safetensors")

save("state_dict", sd)  # the zip format (the default since PyTorch 1.6), pickle protocol 2
save("plain_dict", plain)
save("protocol4", sd, pickle_protocol=4)
save("protocol5", sd, pickle_protocol=5)
save("lenet5", LeNet5().state_dict())
torch.save({"model": sd, "epoch": 3}, f"{out}/checkpoint.pt")

class Custom:
    pass
torch.save({"w": torch.ones(2), "obj": Custom()}, f"{out}/custom.pt")

class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {out}/pwned",))
torch.save({"w": torch.ones(2), "evil": Evil()}, f"{out}/evil.pt")

def rewrite(name, change):
    """Copies state_dict.pt to NAME.pt with change(entry name, bytes) applied to each entry."""
    with zipfile.ZipFile(f"{out}/state_dict.pt") as src, zipfile.ZipFile(f"{out}/{name}.pt", "w") as dst:
        for e in src.namelist():
            dst.writestr(e, change(e, src.read(e)))

rewrite("short_pickle", lambda e, b: b[: len(b) // 2] if e.endswith("/data.pkl") else b)
rewrite("short_storage", lambda e, b: b[:-4] if e.endswith("/data/0") else b)
rewrite("big_endian", lambda e, b: b"big" if e.endswith("/byteorder") else b)
"#;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = support::temp_dir("torch-pickle");
        let out = std::process::Command::new(root.join(".venv/bin/python"))
            .args(["-c", FIXTURES])
            .arg(&dir)
            .current_dir(root)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .expect("the venv's python runs (scripts/setup creates .venv)");
        assert!(out.status.success(), "writing the fixtures failed:\n{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

/// Reads a fixture that must fail and returns its error, checking it is one clean line.
fn error_of(path: &Path) -> String {
    let err = format!("{:#}", read_state_dict(path).expect_err("the file should be refused"));
    assert!(err.starts_with(&path.display().to_string()), "no file name first in {err:?}");
    assert!(!err.contains('\n') && !err.contains("Exception raised from"), "not one clean line: {err:?}");
    err
}

#[test]
fn every_dtype_and_layout_equals_what_safetensors_holds() {
    for name in ["state_dict", "plain_dict", "protocol4", "protocol5"] {
        let ours = read_state_dict(&fixtures().join(format!("{name}.pt"))).unwrap();
        let reference: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures().join(format!("{name}.safetensors"))).unwrap().into_iter().collect();
        let names: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names.iter().copied().collect::<std::collections::BTreeSet<_>>(),
            reference.keys().map(|k| k.as_str()).collect()
        );
        // Exact equality: the bytes are copied, never converted.
        for (key, got) in &ours {
            let want = &reference[key];
            assert_eq!((got.kind(), got.size()), (want.kind(), want.size()), "{name}: {key}");
            assert!(got.equal(want), "{name}: {key} differs:\n{got}\n{want}");
            assert!(got.is_contiguous() && got.device() == Device::Cpu, "{name}: {key}");
        }
        let kinds: Vec<Kind> = ours.iter().map(|(_, t)| t.kind()).collect();
        for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16, Kind::Int64, Kind::Bool] {
            assert!(kinds.contains(&kind), "{name} has no {kind:?} tensor");
        }
    }
    // The fixtures exercise what they claim: the dict order survives, and two tensors share a storage.
    let names: Vec<String> =
        read_state_dict(&fixtures().join("state_dict.pt")).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names[..3], ["f64", "f16", "bf16"]); // a module's own buffers come before its children's
    let zip = zip::ZipArchive::new(std::fs::File::open(fixtures().join("state_dict.pt")).unwrap()).unwrap();
    let storages = zip.file_names().filter(|n| n.as_ref().is_ok_and(|n| n.contains("/data/"))).count();
    assert_eq!((names.len(), storages), (11, 10));
}

#[test]
fn a_lenet5_state_dict_from_pytorch_loads_into_the_rust_model() {
    use lenet5::model::{Arch, Head, LeNet5, ModelConfig};
    let tensors = read_state_dict(&fixtures().join("lenet5.pt")).unwrap();
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let _net = LeNet5::new(&vs.root(), ModelConfig { arch: Arch::Modern, head: Head::Softmax });
    let mut got: Vec<(String, Vec<i64>)> = tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    let mut want: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let fc1 = tensors.iter().find(|(k, _)| k == "fc1.weight").unwrap().1.copy();
    lenet5::formats::weights::load_state_dict(&mut vs, tensors, &[], "lenet5.pt").unwrap();
    assert!(vs.variables()["fc1.weight"].equal(&fc1));
}

#[test]
fn a_checkpoint_holding_more_than_tensors_is_refused_with_its_keys() {
    let err = error_of(&fixtures().join("checkpoint.pt"));
    assert!(err.contains("a dict whose values are not all tensors (keys: \"model\", \"epoch\")"), "{err}");
    assert!(err.contains("save model.state_dict() itself"), "{err}");
}

#[test]
fn globals_outside_the_allow_list_are_refused_and_never_run() {
    let err = error_of(&fixtures().join("custom.pt"));
    assert!(
        err.contains("refuses to load __main__.Custom: only tensors, numbers, strings and containers of them are read"),
        "{err}"
    );
    let err = error_of(&fixtures().join("evil.pt"));
    assert!(err.contains("refuses to load posix.system"), "{err}");
    assert!(!fixtures().join("pwned").exists(), "the pickle ran a command");
}

#[test]
fn damaged_files_give_one_line_errors() {
    let dir = fixtures();
    for (name, expected) in [
        ("short_pickle.pt", "data.pkl is truncated or damaged at byte"),
        ("short_storage.pt", "storage 0 holds 44 bytes, not 48 (6 x Double)"),
        ("big_endian.pt", "tensors stored big-endian"),
        ("missing.pt", "cannot open"),
    ] {
        let err = error_of(&dir.join(name));
        assert!(err.contains(expected), "{name}: {expected:?} not in {err:?}");
    }
    // Cut anywhere, the zip loses its directory or an entry: never a panic, always one line.
    let whole = std::fs::read(dir.join("state_dict.pt")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    let random: Vec<u8> = (0..4096).map(|_| noise()).collect();
    let zip_like: Vec<u8> = b"PK\x03\x04".iter().copied().chain((0..4096).map(|_| noise())).collect();
    let cases = [&whole[..whole.len() / 2], &whole[..whole.len() - 30], &random, &zip_like, b""];
    for (i, bytes) in cases.iter().enumerate() {
        let path = dir.join(format!("damaged{i}.pt"));
        std::fs::write(&path, bytes).unwrap();
        assert!(error_of(&path).contains("not a readable zip archive"));
    }
}
