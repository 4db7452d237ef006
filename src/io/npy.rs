//! NumPy `.npy` arrays (format 1.0/2.0): the exchange format for ground truth, betas and
//! predictions, readable with a bare `numpy.load`.

use std::io::Write;
use std::path::Path;

use crate::volume::Dtype;

/// Writes a C-order little-endian float32 array.
pub fn write_npy(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("npy: shape {shape:?} holds {n} values, got {}", data.len()),
        ));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt =
        if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so the data starts on a 64-byte boundary, header ends with '\n'.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    out.write_all(&crate::volume::f32_le_view(data))?;
    out.flush()
}

/// Reads a numeric array (C or Fortran order) as row-major f32, refusing more than `max_values` elements before
/// allocating. Returns the shape and the values.
pub fn read_npy(path: impl AsRef<Path>, max_values: usize) -> Result<(Vec<usize>, Vec<f32>), String> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| format!("npy: {}: {e}", path.display()))?;
    parse_npy(&bytes, max_values).map_err(|e| format!("npy: {}: {e}", path.display()))
}

/// Parses the bytes of an `.npy` file (see [`read_npy`]).
pub fn parse_npy(bytes: &[u8], max_values: usize) -> Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy file".into());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start.saturating_add(hlen))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated header")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}'")).ok_or(format!("header lacks '{key}'"))?;
        let rest = header[at + key.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').ok_or("malformed header")?.trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or("malformed descr")?;
    let (dtype, endian) = Dtype::parse(descr).ok_or(format!("unsupported dtype {descr}"))?;
    let fortran = field("fortran_order")?.starts_with("True");
    let shape_txt = field("shape")?;
    let shape_txt = shape_txt.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("malformed shape")?;
    let shape = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad dimension {s:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    if n > max_values {
        return Err(format!("{n} values exceeds the limit of {max_values}"));
    }
    let data = &bytes[start + hlen..];
    if data.len() != n * dtype.size() {
        return Err(format!(
            "{} data bytes, shape {shape:?} of {dtype} needs {}",
            data.len(),
            n * dtype.size()
        ));
    }
    let mut out = vec![0f32; n];
    dtype.decode_into(endian, data, &mut out).ok_or("sample size mismatch")?;
    if fortran && shape.len() > 1 {
        out = fortran_to_c_order(&out, &shape);
    }
    Ok((shape, out))
}

/// Reorders a column-major (Fortran) array of `shape` to row-major (C) order.
fn fortran_to_c_order(src: &[f32], shape: &[usize]) -> Vec<f32> {
    // Fortran strides: the first axis is contiguous.
    let strides: Vec<usize> = shape.iter().scan(1, |s, &d| Some(std::mem::replace(s, *s * d))).collect();
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(src.len());
    for _ in 0..src.len() {
        out.push(src[index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        write_npy(&p, &[2, 3], &data).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64, 0);
        assert_eq!(read_npy(&p, 100).unwrap(), (vec![2, 3], data.clone()));
        assert!(read_npy(&p, 5).unwrap_err().contains("limit"));
        write_npy(&p, &[6], &data).unwrap();
        assert_eq!(read_npy(&p, 100).unwrap().0, vec![6]);
        assert!(write_npy(&p, &[4], &data).is_err());
        // A Fortran-order 2 × 3 array comes back in C order.
        write_npy(&p, &[2, 3], &data).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let end = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = String::from_utf8(bytes[10..end].to_vec()).unwrap().replace("False", "True ");
        bytes.splice(10..end, header.bytes());
        bytes.truncate(end);
        bytes.extend([0f32, 3.0, 1.0, 4.0, 2.0, 5.0].iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(read_npy(&p, 100).unwrap(), (vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
    }
}
