//! Class activation maps from a feature map `A` (the target tensor) of one image:
//! - Grad-CAM: `α_k = mean_ij ∂score_c/∂A_k(i,j)`, `map = ReLU(Σ_k α_k A_k)`, the gradient from
//!   [`super::head::Head`] (exact, one forward pass of the model);
//! - ReciproCAM (Byun & Lee, 2022), gradient-free: the head is run on `h·w` copies of `A`, each
//!   kept only around one location by a 3x3 Gaussian, and `map(i,j)` is the class probability;
//!
//! Both are normalised like pytorch-grad-cam: `(m - min) / (1e-7 + max(m - min))`.

use serde::Serialize;

use super::manifest::Layout;

/// Which method produced a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CamMethod {
    /// Exact Grad-CAM through the head.
    #[serde(rename = "grad-cam")]
    GradCam,
    /// Gradient-free ReciproCAM over the head.
    #[serde(rename = "recipro-cam")]
    ReciproCam,
    /// No map (no target tensor or head could be found).
    #[serde(rename = "none")]
    None,
}

impl CamMethod {
    /// The name used in outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            CamMethod::GradCam => "grad-cam",
            CamMethod::ReciproCam => "recipro-cam",
            CamMethod::None => "none",
        }
    }
}

/// A normalised map over the target tensor's grid, values in [0, 1].
#[derive(Debug, Clone)]
pub struct Cam {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Row-major values.
    pub data: Vec<f32>,
    /// Method used.
    pub method: CamMethod,
    /// Class explained.
    pub class: usize,
}

/// Channels, height and width of a 4-D batch-1 feature map.
pub fn feature_dims(shape: &[usize], layout: Layout) -> Option<(usize, usize, usize)> {
    match (shape, layout) {
        ([1, c, h, w], Layout::NCHW) => Some((*c, *h, *w)),
        ([1, h, w, c], Layout::NHWC) => Some((*c, *h, *w)),
        _ => None,
    }
}

fn at(layout: Layout, c: usize, i: usize, w: usize, h: usize, channels: usize) -> usize {
    match layout {
        Layout::NCHW => c * h * w + i,
        Layout::NHWC => i * channels + c,
    }
}

/// Grad-CAM map from the activation `a` and the gradient `g` (same shape).
pub fn grad_cam(
    a: &[f32],
    g: &[f32],
    shape: &[usize],
    layout: Layout,
    class: usize,
) -> Option<Cam> {
    let (c, h, w) = feature_dims(shape, layout)?;
    if a.len() != c * h * w || g.len() != a.len() {
        return None;
    }
    let hw = h * w;
    let alpha: Vec<f32> = (0..c)
        .map(|k| (0..hw).map(|i| g[at(layout, k, i, w, h, c)]).sum::<f32>() / hw as f32)
        .collect();
    let raw: Vec<f32> = (0..hw)
        .map(|i| {
            (0..c)
                .map(|k| alpha[k] * a[at(layout, k, i, w, h, c)])
                .sum::<f32>()
                .max(0.0)
        })
        .collect();
    Some(Cam {
        h,
        w,
        data: normalise(raw),
        method: CamMethod::GradCam,
        class,
    })
}

/// Min-max normalisation as pytorch-grad-cam's `scale_cam_image` does it.
pub fn normalise(mut m: Vec<f32>) -> Vec<f32> {
    let lo = m.iter().copied().fold(f32::INFINITY, f32::min);
    m.iter_mut().for_each(|v| *v -= lo);
    let hi = m.iter().copied().fold(0.0f32, f32::max);
    m.iter_mut().for_each(|v| *v /= 1e-7 + hi);
    m
}

/// The `h·w` masked copies of `a` that ReciproCAM feeds to the head, as one batch.
pub fn reciprocam_batch(
    a: &[f32],
    shape: &[usize],
    layout: Layout,
) -> Option<(Vec<usize>, Vec<f32>)> {
    let (c, h, w) = feature_dims(shape, layout)?;
    const K: [[f32; 3]; 3] = [
        [1.0 / 16.0, 1.0 / 8.0, 1.0 / 16.0],
        [1.0 / 8.0, 1.0 / 4.0, 1.0 / 8.0],
        [1.0 / 16.0, 1.0 / 8.0, 1.0 / 16.0],
    ];
    let n = h * w;
    let mut out = vec![0f32; n * a.len()];
    for (m, chunk) in out.chunks_mut(a.len()).enumerate() {
        let (mi, mj) = ((m / w) as i64, (m % w) as i64);
        for di in -1i64..=1 {
            for dj in -1i64..=1 {
                let (i, j) = (mi + di, mj + dj);
                if i < 0 || j < 0 || i >= h as i64 || j >= w as i64 {
                    continue;
                }
                let weight = K[(di + 1) as usize][(dj + 1) as usize];
                let pos = i as usize * w + j as usize;
                for k in 0..c {
                    let idx = at(layout, k, pos, w, h, c);
                    chunk[idx] = a[idx] * weight;
                }
            }
        }
    }
    let mut batch_shape = shape.to_vec();
    batch_shape[0] = n;
    Some((batch_shape, out))
}

/// ReciproCAM map from the head's scores for the masked batch (`[h·w, classes]`).
pub fn reciprocam_map(
    scores: &[f32],
    classes: usize,
    h: usize,
    w: usize,
    class: usize,
    scores_are_logits: bool,
) -> Option<Cam> {
    if classes == 0 || class >= classes || scores.len() != h * w * classes {
        return None;
    }
    let raw = scores
        .chunks(classes)
        .map(|row| {
            if scores_are_logits {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
                (row[class] - m).exp() / s
            } else {
                row[class]
            }
        })
        .collect();
    Some(Cam {
        h,
        w,
        data: normalise(raw),
        method: CamMethod::ReciproCam,
        class,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grad_cam_weights_channels_by_mean_gradient() {
        // two channels on a 1x2 grid; gradient favours channel 0
        let a = [1.0, 0.0, 0.0, 2.0];
        let g = [0.5, 0.5, -0.25, -0.25];
        let cam = grad_cam(&a, &g, &[1, 2, 1, 2], Layout::NCHW, 0).unwrap();
        // raw = relu([0.5*1 + -0.25*0, 0.5*0 + -0.25*2]) = [0.5, 0]
        assert!((cam.data[0] - 1.0).abs() < 1e-5 && cam.data[1] == 0.0);
        assert_eq!(cam.method, CamMethod::GradCam);
    }

    #[test]
    fn reciprocam_masks_one_neighbourhood_each() {
        let a = vec![1.0f32; 9];
        let (shape, batch) = reciprocam_batch(&a, &[1, 1, 3, 3], Layout::NCHW).unwrap();
        assert_eq!(shape, vec![9, 1, 3, 3]);
        // mask 4 (centre) keeps the full kernel; mask 0 only its corner neighbourhood
        assert!((batch[4 * 9 + 4] - 0.25).abs() < 1e-6);
        assert!((batch[4 * 9] - 1.0 / 16.0).abs() < 1e-6);
        assert_eq!(batch[8], 0.0);
        let cam = reciprocam_map(&[0.0, 1.0, 2.0, 0.0], 2, 1, 2, 1, true).unwrap();
        assert!(cam.data[0] > 0.99 && cam.data[1] < 1e-6);
    }
}
