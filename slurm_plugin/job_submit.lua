--[[
sifoverlay's job_submit/lua (slurm.conf: JobSubmitPlugins=lua; slurmctld reads job_submit.lua
from the directory of slurm.conf). docs/slurm.md "Multi-node rules" and "Writers queue".

For a job submitted with --oci-sif-overlay=PATH:MODE (the plugin hands it to slurmctld as
OCI_SIF_OVERLAY in the job's SPANK environment):
  * rw is for single-node jobs: a job that asks for more than one node is refused here, with
    one line naming the rule; a rw job that names no node count gets at most one node.
  * the image's writer/reader slot is a Slurm license: PATH hashes to one of SLOTS licenses
    sifo_img_NNN, each with count READERS (slurm.conf Licenses=, written by the same rule).
    A rw job asks for all READERS of its image's license, a ro job for one. slurmctld then
    keeps a writer PENDING (Reason=Licenses) while its image is held, and starts it when
    the holder ends: arrays of rw tasks and concurrent writers queue instead of failing.
The Prolog enforces the same rules on the node (and the lease underneath): this script
makes a refusal early and a conflict a wait, it does not make them safe.
]]

local SLOTS = 256   -- licenses sifo_img_000 .. sifo_img_255
local READERS = 64  -- count of each license: concurrent ro jobs of one image (hash bucket)
local NO_VAL = 4294967294
-- the same words as the Prolog's refusal (sifoverlay/slurm/multinode.py RULE)
local RULE = "rw needs a single-node job (one ext3 is never mounted read-write on two nodes); use -N1, or :ro for a multi-node job"

local function request_of(job_desc)
	local env = job_desc.spank_job_env
	if env == nil then
		return nil
	end
	for _, entry in pairs(env) do
		local value = string.match(entry, "^OCI_SIF_OVERLAY=(.+)$")
			or string.match(entry, "^SPANK_OCI_SIF_OVERLAY=(.+)$")
		if value then
			local path, mode = string.match(value, "^(.+):(r[wo])$")
			if path then
				return path, mode
			end
			return value, "rw"
		end
	end
	return nil
end

local function slot_of(path)
	local h = 5381
	for i = 1, #path do
		h = (h * 33 + string.byte(path, i)) % 2147483647
	end
	return string.format("sifo_img_%03d", h % SLOTS)
end

local function given(n)
	return n ~= nil and n ~= NO_VAL and n ~= 0
end
local function given_offset(n) -- het_job_offset: 0 is the first component
	return n ~= nil and n ~= NO_VAL
end

function slurm_job_submit(job_desc, part_list, submit_uid)
	local path, mode = request_of(job_desc)
	if path == nil then
		return slurm.SUCCESS
	end
	if mode == "rw" then
		if given_offset(job_desc.het_job_offset) then
			slurm.log_user("--oci-sif-overlay=%s:rw: %s (a heterogeneous job is one job on several allocations)", path, RULE)
			return slurm.ERROR
		end
		local most = job_desc.max_nodes
		if (given(job_desc.min_nodes) and job_desc.min_nodes > 1) or (given(most) and most > 1) then
			slurm.log_user("--oci-sif-overlay=%s:rw: %s", path, RULE)
			return slurm.ERROR
		end
		if not given(most) then
			job_desc.max_nodes = 1
		end
	end
	local want = slot_of(path) .. ":" .. (mode == "rw" and READERS or 1)
	if job_desc.licenses == nil or job_desc.licenses == "" then
		job_desc.licenses = want
	else
		job_desc.licenses = job_desc.licenses .. "," .. want
	end
	slurm.log_info("sifoverlay: job of uid %u: %s:%s -> license %s", submit_uid, path, mode, want)
	return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
	return slurm.SUCCESS
end
