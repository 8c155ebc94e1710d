//! Reading and writing weight files for the native Candle architectures:
//! safetensors, PyTorch `.pth` (the zip format through candle's reader, the
//! legacy pre-1.6 format through candle's pickle machine) and the
//! initializers of an ONNX model.
//!
//! Owns: file formats only; knows nothing of architectures.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

pub type Weights = HashMap<String, Tensor>;

fn err(path: &Path, why: impl std::fmt::Display) -> String {
    format!("{}: {why}", path.display())
}

/// Loads every tensor of a `.safetensors` or `.pth` file, as f32 on the CPU.
pub fn load(path: &Path) -> Result<Weights, String> {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| err(path, e))?;
    let raw: Weights = if path.extension().is_some_and(|e| e == "onnx") {
        read_onnx_initializers(path)?
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(path, e))?
    } else if head.starts_with(b"PK") {
        check_zip_pickles(path)?;
        candle_core::pickle::read_all(path)
            .map_err(|e| err(path, e))?
            .into_iter()
            .collect()
    } else if head[0] == 0x80 {
        read_legacy_pth(path)?
    } else {
        return Err(err(path, "neither safetensors nor a PyTorch checkpoint"));
    };
    raw.into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, t)| t.to_dtype(DType::F32).map(|t| (k, t)).map_err(|e| err(path, e)))
        .collect()
}

/// The float initializers of an ONNX model (its weights), by name.
fn read_onnx_initializers(path: &Path) -> Result<Weights, String> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    let model = super::onnx_proto::parse_model(&bytes).map_err(|e| err(path, e))?;
    let mut out = Weights::new();
    for t in &model.graph.initializers {
        let dtype = match t.data_type {
            super::onnx_proto::FLOAT => DType::F32,
            super::onnx_proto::FLOAT16 => DType::F16,
            super::onnx_proto::DOUBLE => DType::F64,
            _ => continue,
        };
        if t.external {
            return Err(err(
                path,
                format!("initializer `{}` is stored outside the file", t.name),
            ));
        }
        let dims = t.shape(dtype.size_in_bytes()).map_err(|e| err(path, e))?;
        let tensor = Tensor::from_raw_buffer(&t.raw, dtype, &dims, &Device::Cpu).map_err(|e| err(path, e))?;
        out.insert(t.name.clone(), tensor);
    }
    Ok(out)
}

/// Loads safetensors bytes held in memory (the embedded default model), in
/// the dtype they are stored in (f16): the architecture converts each layer
/// to f32 as it compiles it, so the whole checkpoint is never held in f32
/// beside its compiled form.
pub fn load_bytes(bytes: &[u8]) -> Result<Weights, String> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())
}

/// Writes `weights` as safetensors in `dtype` (f16 halves the file).
pub fn save(weights: &Weights, dtype: DType, path: &Path) -> Result<(), String> {
    let converted: Weights = weights
        .iter()
        .map(|(k, t)| t.to_dtype(dtype).map(|t| (k.clone(), t)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| err(path, e))?;
    candle_core::safetensors::save(&converted, path).map_err(|e| err(path, e))
}

/// The pre-1.6 PyTorch format: pickles for the magic number, protocol
/// version and system info, the state dict (tensors point at storages by
/// key), the list of storage keys, then each storage as an 8-byte element
/// count and raw little-endian data.
fn read_legacy_pth(path: &Path) -> Result<Weights, String> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    // The magic number 0x1950a86a20f9469cfc6c is an 80-bit LONG1, wider than
    // candle's pickle machine takes, so that first pickle is matched byte for byte.
    if !bytes.starts_with(&LEGACY_MAGIC) {
        return Err(err(path, "not a PyTorch checkpoint (bad magic number)"));
    }
    let mut at = LEGACY_MAGIC.len();
    let mut next = |what: &str| -> Result<Object, String> {
        let len = check_pickle(&bytes[at..]).map_err(|e| err(path, format!("{what}: {e}")))?;
        let mut s = Stack::empty();
        s.read_loop(&mut &bytes[at..at + len])
            .map_err(|e| err(path, format!("{what}: {e}")))?;
        at += len;
        s.finalize().map_err(|e| err(path, format!("{what}: {e}")))
    };
    match next("protocol version")? {
        Object::Int(1001) => {}
        other => return Err(err(path, format!("unknown legacy protocol version {other:?}"))),
    }
    next("system info")?;
    let state = next("state dict")?;
    let keys = next("storage keys")?;
    let mut r = &bytes[at..];
    let Object::Dict(items) = state else {
        return Err(err(path, "the state dict is not a dict"));
    };
    let Object::List(keys) = keys else {
        return Err(err(path, "no storage key list"));
    };

    // name -> (storage key, dtype, offset, shape, strides)
    let mut tensors = Vec::new();
    for (name, value) in items {
        let Object::Unicode(name) = name else { continue };
        let Object::Reduce { callable, args } = value else {
            continue;
        };
        match *callable {
            Object::Class {
                module_name,
                class_name,
            } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
            _ => continue,
        }
        let Object::Tuple(args) = *args else { continue };
        let mut args = args.into_iter();
        let (Some(Object::PersistentLoad(pid)), Some(offset), Some(Object::Tuple(size)), Some(Object::Tuple(stride))) =
            (args.next(), args.next(), args.next(), args.next())
        else {
            return Err(err(path, format!("tensor {name}: unexpected layout")));
        };
        let Object::Tuple(pid) = *pid else {
            return Err(err(path, format!("tensor {name}: bad storage id")));
        };
        let (kind, key) = match (pid.get(1), pid.get(2)) {
            (Some(Object::Class { class_name, .. }), Some(Object::Unicode(k))) => (class_name.clone(), k.clone()),
            _ => return Err(err(path, format!("tensor {name}: bad storage id"))),
        };
        let dtype = match kind.as_str() {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "ByteStorage" => DType::U8,
            _ => continue,
        };
        let int = |o: Object| {
            o.int_or_long()
                .map(|v| v as usize)
                .map_err(|_| err(path, format!("tensor {name}: bad int")))
        };
        let shape: Vec<usize> = size.into_iter().map(int).collect::<Result<_, _>>()?;
        let strides: Vec<usize> = stride.into_iter().map(int).collect::<Result<_, _>>()?;
        if strides.len() != shape.len() {
            return Err(err(
                path,
                format!(
                    "tensor {name}: {} strides for {} dimensions",
                    strides.len(),
                    shape.len()
                ),
            ));
        }
        let offset = int(offset)?;
        tensors.push((name, key, dtype, offset, shape, strides));
    }

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let Object::Unicode(key) = key else {
            return Err(err(path, "bad storage key"));
        };
        let mut n = [0u8; 8];
        r.read_exact(&mut n)
            .map_err(|e| err(path, format!("storage {key}: {e}")))?;
        let numel = u64::from_le_bytes(n) as usize;
        let size = tensors
            .iter()
            .find(|t| t.1 == key)
            .map(|t| t.2.size_in_bytes())
            .unwrap_or(4);
        let bytes = numel.checked_mul(size).ok_or_else(|| err(path, "storage too large"))?;
        // Read what is there, up to the declared size: a corrupt count costs
        // no more memory than the file holds.
        let mut data = Vec::new();
        (&mut r)
            .take(bytes as u64)
            .read_to_end(&mut data)
            .map_err(|e| err(path, format!("storage {key}: {e}")))?;
        if data.len() != bytes {
            return Err(err(
                path,
                format!("storage {key}: declares {bytes} bytes, the file holds {}", data.len()),
            ));
        }
        storages.insert(key, data);
    }

    let mut out = Weights::new();
    for (name, key, dtype, offset, shape, strides) in tensors {
        let data = storages
            .get(&key)
            .ok_or_else(|| err(path, format!("tensor {name}: storage {key} missing")))?;
        let esize = dtype.size_in_bytes();
        let outside = || err(path, format!("tensor {name}: outside its storage"));
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(outside)?;
        // Strides that are a permutation of a contiguous layout (a transposed
        // weight): read it in storage order, then permute back.
        let mut order: Vec<usize> = (0..shape.len()).collect();
        order.sort_by(|a, b| strides[*b].cmp(&strides[*a]).then(a.cmp(b)));
        let stored: Vec<usize> = order.iter().map(|&i| shape[i]).collect();
        let permuted_strides: Vec<usize> = order.iter().map(|&i| strides[i]).collect();
        if numel > 1 && Some(permuted_strides) != contiguous_strides(&stored) {
            return Err(err(
                path,
                format!("tensor {name}: strides {strides:?} for shape {shape:?} are not supported"),
            ));
        }
        let start = offset.checked_mul(esize).ok_or_else(outside)?;
        let end = offset
            .checked_add(numel)
            .and_then(|e| e.checked_mul(esize))
            .ok_or_else(outside)?;
        let bytes = data.get(start..end).ok_or_else(outside)?;
        let t = Tensor::from_raw_buffer(bytes, dtype, &stored, &Device::Cpu).map_err(|e| err(path, e))?;
        let mut inverse = vec![0; order.len()];
        for (pos, &dim) in order.iter().enumerate() {
            inverse[dim] = pos;
        }
        let t = if numel > 1 && inverse.iter().enumerate().any(|(i, &p)| i != p) {
            t.permute(inverse)
                .and_then(|t| t.contiguous())
                .map_err(|e| err(path, e))?
        } else {
            t
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Checks the pickles of a zip `.pth` (`*/data.pkl`) before candle reads the file.
fn check_zip_pickles(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| err(path, e))?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| err(path, e))?;
        if !entry.name().map_err(|e| err(path, e))?.ends_with("data.pkl") {
            continue;
        }
        let mut pickle = Vec::new();
        (&mut entry)
            .take(MAX_PICKLE + 1)
            .read_to_end(&mut pickle)
            .map_err(|e| err(path, e))?;
        if pickle.len() as u64 > MAX_PICKLE {
            return Err(err(path, "the pickle is over 64 MiB"));
        }
        check_pickle(&pickle).map_err(|e| err(path, format!("data.pkl: {e}")))?;
    }
    Ok(())
}

/// The largest `data.pkl` read (it holds names and shapes, not weights).
const MAX_PICKLE: u64 = 64 << 20;

/// The length of the pickle at the start of `b`, up to and including its
/// STOP, walking every opcode's argument. Refuses a truncated stream, an
/// unknown opcode, and what candle's pickle machine would mishandle: a LONG1
/// wider than 8 bytes (its decoder shifts past 64 bits).
fn check_pickle(b: &[u8]) -> Result<usize, String> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<(), String> {
        match at.checked_add(n) {
            Some(end) if end <= b.len() => {
                *at = end;
                Ok(())
            }
            _ => Err("truncated".into()),
        }
    };
    let len_le = |at: usize, n: usize| -> Result<usize, String> {
        let bytes = b.get(at..at + n).ok_or("truncated")?;
        let v = bytes.iter().rev().fold(0u64, |v, &x| (v << 8) | x as u64);
        usize::try_from(v).map_err(|_| "length too large".to_string())
    };
    let line = |at: &mut usize| -> Result<(), String> {
        let n = b[*at..].iter().position(|&c| c == b'\n').ok_or("truncated")?;
        *at += n + 1;
        Ok(())
    };
    loop {
        let op = *b.get(at).ok_or("truncated: no STOP")?;
        at += 1;
        match op {
            b'.' => return Ok(at),
            // No argument.
            b'('
            | b'0'
            | b'1'
            | b'2'
            | b'N'
            | b'R'
            | b'a'
            | b'b'
            | b'd'
            | b'}'
            | b'e'
            | b'l'
            | b']'
            | b'o'
            | b's'
            | b't'
            | b')'
            | b'u'
            | b'Q'
            | 0x81
            | 0x85..=0x89
            | 0x8f..=0x94
            | 0x97
            | 0x98 => {}
            // Fixed-size arguments.
            b'K' | b'q' | b'h' | 0x80 | 0x82 => take(&mut at, 1)?,
            b'M' | 0x83 => take(&mut at, 2)?,
            b'J' | b'r' | b'j' | 0x84 => take(&mut at, 4)?,
            b'G' | 0x95 => take(&mut at, 8)?,
            0x8a => {
                let n = len_le(at, 1)?;
                if n > 8 {
                    return Err(format!("a {n}-byte integer (LONG1) is wider than 64 bits"));
                }
                take(&mut at, 1 + n)?;
            }
            // A length, then that many bytes.
            b'U' | 0x8c | b'C' => {
                let n = len_le(at, 1)?;
                take(&mut at, 1)?;
                take(&mut at, n)?;
            }
            b'T' | b'X' | b'B' | 0x8b => {
                let n = len_le(at, 4)?;
                take(&mut at, 4)?;
                take(&mut at, n)?;
            }
            0x8d | 0x8e | 0x96 => {
                let n = len_le(at, 8)?;
                take(&mut at, 8)?;
                take(&mut at, n)?;
            }
            // Newline-terminated arguments.
            b'I' | b'L' | b'S' | b'V' | b'F' | b'p' | b'g' | b'P' => line(&mut at)?,
            b'c' | b'i' => {
                line(&mut at)?;
                line(&mut at)?;
            }
            other => return Err(format!("unknown pickle opcode 0x{other:02x}")),
        }
    }
}

/// `pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)`.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// Row-major strides of `shape`; `None` when they overflow.
fn contiguous_strides(shape: &[usize]) -> Option<Vec<usize>> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].checked_mul(shape[i + 1])?;
    }
    Some(s)
}
