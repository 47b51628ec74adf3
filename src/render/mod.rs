//! Pictures and arrays out: the heatmap overlay PNG and `.npy` dumps. Pure functions of pixels.

pub mod npy;
pub mod overlay;
