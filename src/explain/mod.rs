//! Showing how LeNet-5 computes: the convolution walkthrough, the stage-by-stage pictures of
//! `lenet5 visualize`, and the PNG drawing both use.

pub mod conv;
pub mod pictures;
pub mod visualize;

use anyhow::{ensure, Result};

use crate::data::Dataset;

/// The class whose first test image is followed by default: the "3" of the LeNet-5 walkthroughs.
pub const DEFAULT_CLASS: i64 = 3;

/// `index` checked against the test set, or the first image of [`DEFAULT_CLASS`].
pub fn pick_index(test: &Dataset, index: Option<i64>) -> Result<i64> {
    match index {
        Some(i) => {
            crate::check_setting!(
                (0..test.len()).contains(&i),
                "index",
                i,
                "the test set has images 0 to {}",
                test.len() - 1
            );
            Ok(i)
        }
        None => {
            let hits = test.labels.eq(DEFAULT_CLASS).nonzero(); // (K, 1)
            ensure!(
                hits.size()[0] > 0,
                "the test set holds no image of class {DEFAULT_CLASS}; choose one by its index"
            );
            Ok(hits.int64_value(&[0, 0]))
        }
    }
}
