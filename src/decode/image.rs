//! Small images out: PNG bytes of a predicted picture, so a subscriber can show it at once.

use super::DecodeError;

/// PNG of an image with values in [0, 1]: shape `[h, w]` or `[1, h, w]` (grayscale) or
/// `[3, h, w]` (RGB, channels first). Values are clamped and scaled to 8 bits.
pub fn png(values: &[f32], shape: &[usize]) -> Result<Vec<u8>, DecodeError> {
    let (c, h, w) = match shape {
        [h, w] => (1, *h, *w),
        [c @ (1 | 3), h, w] => (*c, *h, *w),
        other => {
            return Err(DecodeError::Input(format!(
                "shape {other:?} is not an image ([h,w], [1,h,w] or [3,h,w])"
            )))
        }
    };
    if values.len() != c * h * w || h == 0 || w == 0 {
        return Err(DecodeError::Input(format!("{} values for an image of shape {shape:?}", values.len())));
    }
    let byte = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let pixels: Vec<u8> = if c == 1 {
        values.iter().map(|v| byte(*v)).collect()
    } else {
        (0..h * w).flat_map(|p| (0..3).map(move |ch| ch * h * w + p)).map(|i| byte(values[i])).collect()
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(if c == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| DecodeError::Input(format!("png: {e}")))?;
        writer.write_image_data(&pixels).map_err(|e| DecodeError::Input(format!("png: {e}")))?;
    }
    Ok(out)
}

/// PNG of a VAE's picture `[3, h, w]` (values about −1 to 1): `x / 2 + 0.5` as diffusers' image
/// processors map it, then clamped to [0, 1].
pub fn png_of_signed(picture: &candle_core::Tensor) -> Result<Vec<u8>, DecodeError> {
    let values = picture
        .to_dtype(candle_core::DType::F32)
        .and_then(|p| p.affine(0.5, 0.5))
        .and_then(|p| p.flatten_all())
        .and_then(|p| p.to_vec1::<f32>())
        .map_err(|e| DecodeError::Compute(e.to_string()))?;
    png(&values, picture.dims())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_through_a_decoder() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 / 11.0).collect();
        let bytes = png(&values, &[1, 3, 4]).unwrap();
        let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (4, 3));
        assert_eq!(buf[..12].to_vec(), values.iter().map(|v| (v * 255.0).round() as u8).collect::<Vec<_>>());
        assert!(png(&values, &[2, 3, 2]).is_err());
        assert!(png(&values, &[1, 4, 4]).is_err());
    }
}
