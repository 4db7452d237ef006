//! Siemens' CSA header (DICOM element (0029,1010), "CSA Image Header Info"): a private binary
//! list of named values that carries what a mosaic needs — the number of slices tiled in the
//! image and the slice normal. No DICOM crate reads it.
//!
//! ```text
//! "SV10" 04 03 02 01 | n_tags u32 | 77 u32                      (CSA2; CSA1 starts at n_tags)
//! per tag:  name [64] NUL-padded | vm i32 | vr [4] | syngodt i32 | n_items i32 | 77 or 205 i32
//! per item: 4 × i32 (the second is the item length) | the value as text, padded to 4 bytes
//! ```

use std::collections::BTreeMap;

/// Largest tag or item count accepted (real headers have about 100 tags of a few items).
const MAX_COUNT: usize = 4096;

/// The header's values by name, each as its list of text items.
pub type CsaHeader = BTreeMap<String, Vec<String>>;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("CSA header ends at byte {} (needs {n} more)", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn count(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n > MAX_COUNT {
            return Err(format!("CSA header: {n} {what}"));
        }
        Ok(n)
    }
}

/// Parses a CSA1 or CSA2 header.
pub fn parse(bytes: &[u8]) -> Result<CsaHeader, String> {
    let mut r = Reader { bytes, at: 0 };
    if bytes.starts_with(b"SV10") {
        r.take(8)?;
    }
    let n_tags = r.count("tags")?;
    r.u32()?;
    let mut out = CsaHeader::new();
    for _ in 0..n_tags {
        let name = r.take(64)?;
        let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        r.take(4 + 4 + 4)?;
        let n_items = r.count("items")?;
        r.u32()?;
        let mut items = Vec::new();
        for _ in 0..n_items {
            r.u32()?;
            let len = r.count("bytes in an item")?;
            r.take(8)?;
            let value = r.take(len)?;
            r.take((4 - len % 4) % 4)?;
            let text = String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or_default());
            let text = text.trim();
            if !text.is_empty() {
                items.push(text.to_string());
            }
        }
        out.insert(name, items);
    }
    Ok(out)
}

/// The numbers of value `name`, when every item is one.
pub fn numbers(h: &CsaHeader, name: &str) -> Option<Vec<f64>> {
    let items = h.get(name)?;
    let values: Option<Vec<f64>> =
        items.iter().map(|s| s.parse::<f64>().ok().filter(|v| v.is_finite())).collect();
    values.filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, items: &[&str]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b.extend(1i32.to_le_bytes());
        b.extend(b"IS\0\0");
        b.extend(6i32.to_le_bytes());
        b.extend((items.len() as i32).to_le_bytes());
        b.extend(77i32.to_le_bytes());
        for it in items {
            let len = it.len() as i32;
            for v in [len, len, 77, len] {
                b.extend(v.to_le_bytes());
            }
            b.extend(it.as_bytes());
            b.extend(std::iter::repeat_n(0, (4 - it.len() % 4) % 4));
        }
        b
    }

    fn header(tags: &[Vec<u8>]) -> Vec<u8> {
        let mut b = b"SV10\x04\x03\x02\x01".to_vec();
        b.extend((tags.len() as u32).to_le_bytes());
        b.extend(77u32.to_le_bytes());
        tags.iter().for_each(|t| b.extend(t));
        b
    }

    #[test]
    fn reads_names_and_numbers() {
        let h = parse(&header(&[
            tag("NumberOfImagesInMosaic", &["18"]),
            tag("SliceNormalVector", &["0.0", "0.16", "0.987"]),
            tag("Empty", &[]),
        ]))
        .unwrap();
        assert_eq!(numbers(&h, "NumberOfImagesInMosaic"), Some(vec![18.0]));
        assert_eq!(numbers(&h, "SliceNormalVector"), Some(vec![0.0, 0.16, 0.987]));
        assert_eq!(numbers(&h, "Empty"), None);
    }

    #[test]
    fn cut_or_hostile_headers_are_errors_not_panics() {
        let good = header(&[tag("NumberOfImagesInMosaic", &["18"])]);
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        assert!(parse(&good[..good.len() - 3]).is_err());
        let mut huge = b"SV10\x04\x03\x02\x01".to_vec();
        huge.extend(u32::MAX.to_le_bytes());
        huge.extend(77u32.to_le_bytes());
        assert!(parse(&huge).unwrap_err().contains("tags"));
    }
}
