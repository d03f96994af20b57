pub mod generate;
pub mod queries;
pub mod verticals;
