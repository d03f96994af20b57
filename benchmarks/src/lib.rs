pub mod generate;
pub mod queries;
