-- The prompt_id a participant knows a job by, unique per participant only: two participants
-- may choose the same one, and neither learns that the other did. `id` stays the job's
-- globally unique internal id (what the GPU servers see); it equals prompt_id unless another
-- job already had that id, in which case the store gave the job a fresh one.
ALTER TABLE jobs ADD COLUMN prompt_id TEXT;
UPDATE jobs SET prompt_id = id;
CREATE UNIQUE INDEX jobs_by_user_prompt_id ON jobs (user_name, prompt_id);
