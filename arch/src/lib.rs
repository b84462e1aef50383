pub mod acpi;
