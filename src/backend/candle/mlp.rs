//! A multilayer perceptron for sensor models: dense layers `layers.{i}.weight` (`[out, in]`,
//! PyTorch's `nn.Linear` layout) and `layers.{i}.bias`, ReLU between them, none after the
//! last. Small enough that plain loops over preallocated buffers beat any dispatch.
//!
//! Owns: reading those tensors from a checkpoint (safetensors, `.pth`, or an ONNX file's
//! initializers of the same names), checking that the layers chain, and running them.

use candle_core::DType;

use super::weights::Weights;

/// Most layers, and most units in one, a checkpoint may declare.
const MAX_LAYERS: usize = 64;
const MAX_UNITS: usize = 1 << 16;

struct Dense {
    /// `[out][in]`, row-major.
    w: Vec<f32>,
    b: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

pub struct Mlp {
    layers: Vec<Dense>,
    /// The two activations a run ping-pongs between, sized for the widest layer.
    a: Vec<f32>,
    b: Vec<f32>,
}

fn values(w: &Weights, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let t = w.get(name).ok_or_else(|| format!("missing tensor `{name}`"))?;
    let dims = t.dims().to_vec();
    let v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| format!("`{name}`: {e}"))?;
    Ok((dims, v))
}

impl Mlp {
    pub fn load(w: &Weights) -> Result<Mlp, String> {
        let mut layers: Vec<Dense> = Vec::new();
        while w.contains_key(&format!("layers.{}.weight", layers.len())) {
            let i = layers.len();
            if i == MAX_LAYERS {
                return Err(format!("more than {MAX_LAYERS} layers"));
            }
            let (wd, wv) = values(w, &format!("layers.{i}.weight"))?;
            let (bd, bv) = values(w, &format!("layers.{i}.bias"))?;
            let [outputs, inputs] = wd[..] else {
                return Err(format!("`layers.{i}.weight` has shape {wd:?}; expected [out, in]"));
            };
            if outputs == 0 || inputs == 0 || outputs > MAX_UNITS || inputs > MAX_UNITS {
                return Err(format!(
                    "`layers.{i}.weight` has shape {wd:?}; 1 to {MAX_UNITS} units a layer"
                ));
            }
            if bd[..] != [outputs] {
                return Err(format!("`layers.{i}.bias` has shape {bd:?}; expected [{outputs}]"));
            }
            if let Some(prev) = layers.last() {
                if prev.outputs != inputs {
                    return Err(format!(
                        "layer {i} takes {inputs} inputs but layer {} gives {}",
                        i - 1,
                        prev.outputs
                    ));
                }
            }
            layers.push(Dense {
                w: wv,
                b: bv,
                inputs,
                outputs,
            });
        }
        if layers.is_empty() {
            return Err("no `layers.0.weight`: not a dense network checkpoint".into());
        }
        let widest = layers.iter().map(|l| l.inputs.max(l.outputs)).max().unwrap_or(0);
        Ok(Mlp {
            layers,
            a: vec![0.0; widest],
            b: vec![0.0; widest],
        })
    }

    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }

    pub fn outputs(&self) -> usize {
        self.layers[self.layers.len() - 1].outputs
    }

    /// Runs the layers on `input` (exactly [`Self::inputs`] values); the output borrows a
    /// buffer of the network's.
    pub fn forward(&mut self, input: &[f32]) -> Result<&[f32], String> {
        if input.len() != self.inputs() {
            return Err(format!(
                "input has {} values; the network takes {}",
                input.len(),
                self.inputs()
            ));
        }
        self.a[..input.len()].copy_from_slice(input);
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            let (x, y) = (&self.a[..l.inputs], &mut self.b[..l.outputs]);
            for (o, y) in y.iter_mut().enumerate() {
                let row = &l.w[o * l.inputs..(o + 1) * l.inputs];
                let s: f32 = row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + l.b[o];
                *y = if i < last { s.max(0.0) } else { s };
            }
            std::mem::swap(&mut self.a, &mut self.b);
        }
        Ok(&self.a[..self.outputs()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn weights(shapes: &[(usize, usize)]) -> Weights {
        let mut w = Weights::new();
        for (i, &(o, n)) in shapes.iter().enumerate() {
            let v: Vec<f32> = (0..o * n).map(|k| ((k * 7 + i) % 11) as f32 / 11.0 - 0.5).collect();
            let b: Vec<f32> = (0..o).map(|k| (k % 3) as f32 * 0.1 - 0.1).collect();
            w.insert(
                format!("layers.{i}.weight"),
                Tensor::from_vec(v, (o, n), &Device::Cpu).unwrap(),
            );
            w.insert(
                format!("layers.{i}.bias"),
                Tensor::from_vec(b, o, &Device::Cpu).unwrap(),
            );
        }
        w
    }

    #[test]
    fn matches_candles_matmul_relu_chain() {
        let w = weights(&[(16, 24), (4, 16), (16, 4), (24, 16)]);
        let mut mlp = Mlp::load(&w).unwrap();
        let x: Vec<f32> = (0..24).map(|k| (k as f32 - 12.0) / 7.0).collect();
        let got = mlp.forward(&x).unwrap().to_vec();
        let mut t = Tensor::from_vec(x, (1, 24), &Device::Cpu).unwrap();
        for i in 0..4 {
            let wt = w[&format!("layers.{i}.weight")].t().unwrap();
            t = t
                .matmul(&wt)
                .unwrap()
                .broadcast_add(&w[&format!("layers.{i}.bias")])
                .unwrap();
            if i < 3 {
                t = t.relu().unwrap();
            }
        }
        let want = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), 24);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn layers_that_do_not_chain_are_refused() {
        let e = Mlp::load(&weights(&[(16, 24), (4, 8)])).err().unwrap();
        assert!(e.contains("layer 1 takes 8 inputs but layer 0 gives 16"), "{e}");
        assert!(Mlp::load(&Weights::new()).err().unwrap().contains("layers.0.weight"));
        let mut w = weights(&[(4, 3)]);
        w.insert(
            "layers.0.bias".into(),
            Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(Mlp::load(&w).err().unwrap().contains("expected [4]"));
        let mut ok = Mlp::load(&weights(&[(4, 3)])).unwrap();
        assert!(ok.forward(&[1.0, 2.0]).is_err());
    }
}
