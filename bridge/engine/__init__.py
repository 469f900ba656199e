"""One pass: discover -> plan -> execute -> record. The planner decides; the executor carries out."""
