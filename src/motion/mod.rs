//! The motion stage: rigid-body geometry shared by realignment and the simulator.

pub mod rigid;
